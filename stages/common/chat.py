"""Tokenizers and chat format: the locally built character tokenizer of the tiny default, the locally
trained byte-level BPE tokenizer with a Qwen-style ChatML template of the tiny chat model, and the
token-level pieces every stage uses to build conversations.

Conversations are built as token ids piece by piece (prompt, sampled answer, feedback turn, ...),
never by re-tokenising decoded text: RL must train on exactly the ids that were sampled, and a decode
→ encode round trip can silently change them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

PAD, UNK, USER, ASSISTANT, END = "<pad>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>"

# The tiny tokenizer's chat template. Role markers are single tokens, which keeps sequences short.
TINY_CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}" + USER + "{{ m['content'] }}" + END
    + "{%- elif m['role'] == 'assistant' -%}" + ASSISTANT + "{{ m['content'] }}" + END
    + "{%- else -%}{{ raise_exception('unsupported role: ' + m['role']) }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}" + ASSISTANT + "{%- endif -%}"
)

# Characters always in the vocabulary, whatever the training texts hold: answers are numbers.
BASE_CHARS = "0123456789+-*/=.,()? "


def build_char_tokenizer(texts: list[str], feedback: str) -> PreTrainedTokenizerFast:
    """A character-level tokenizer built from `texts`, with the feedback line as ONE added token.

    One token for "Let's try again." instead of ~16 keeps multi-turn sequences ~2.8x shorter, which
    is what makes SFT and RL fit the CPU budget (see shared/research/tiny-cpu-calibration.md).
    """
    chars = sorted(set(BASE_CHARS).union(*map(set, texts)))
    specials = [PAD, UNK, USER, ASSISTANT, END]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, normalized=False) for t in specials])
    tok.add_tokens([AddedToken(feedback, normalized=False, single_word=False)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, unk_token=UNK, eos_token=END, bos_token=None,
        additional_special_tokens=[USER, ASSISTANT],
    )
    fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


# Qwen2's ChatML specials and template (as in Qwen2-Instruct's tokenizer_config.json): a default system
# prompt when the conversation has none; every turn is `<|im_start|>role\ncontent<|im_end|>\n`.
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
CHATML_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if loop.first and m['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
# Qwen2's pre-tokenizer split: contractions, letter runs, ONE digit at a time (numbers stay
# digit-aligned, which arithmetic needs), punctuation runs, newlines, spaces.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def build_chatml_bpe_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained here on `texts`, with Qwen2's specials, split and ChatML template.

    Byte-level: any text encodes, so the feedback and the system prompt are ordinary text whatever the
    curated texts hold (pass them in `texts` to give them merges). The chat's fixed strings are added to
    the training texts so role names and the system prompt take few tokens.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    specials = [ENDOFTEXT, IM_START, IM_END]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    fixed = ["system", "user", "assistant", DEFAULT_SYSTEM_PROMPT]
    tok.train_from_iterator([*texts, *fixed], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=IM_END, pad_token=ENDOFTEXT, bos_token=None,
                                   unk_token=None, additional_special_tokens=[IM_START])
    fast.chat_template = CHATML_TEMPLATE
    return fast


@dataclass(frozen=True)
class Message:
    """One chat message. `train` marks an assistant message whose tokens carry SFT loss."""

    role: str
    content: str
    train: bool = True


_SENTINEL = "\u2063ANSWER\u2063"  # never encoded: only used to locate the answer in rendered text


@dataclass
class ChatFormat:
    """Token-level pieces of a UFO conversation for a given tokenizer and its chat template.

    ids(episode) = prompt_ids(question) + answer_0 + feedback_ids + answer_1 + feedback_ids + ...
    where each answer_t is exactly what the model sampled (ending with `eos_id` when it stopped).
    """

    tokenizer: PreTrainedTokenizerBase
    feedback: str
    # Rendering the chat template (jinja) costs ~0.1 ms a call and SFT and rollouts re-ask the same
    # prompts and answers: token ids are memoised per (kind, text).
    _memo: dict[tuple[str, str], list[int]] = field(default_factory=dict, repr=False)

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def pad_id(self) -> int:
        pid = self.tokenizer.pad_token_id
        return pid if pid is not None else self.eos_id

    def _render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _memoised(self, kind: str, text: str, build: Callable[[str], list[int]]) -> list[int]:
        """build(text), computed once per (kind, text); a fresh list each call, so callers may extend it."""
        key = (kind, text)
        if key not in self._memo:
            self._memo[key] = build(text)
        return list(self._memo[key])

    def prompt_ids(self, question: str, system: str | None = None) -> list[int]:
        """The first user turn plus the assistant header: what the model answers at turn 0. With no
        `system`, the template's default system prompt (if it has one, as Qwen's does) is part of it."""
        head = [] if system is None else [{"role": "system", "content": system}]
        return self._memoised(
            f"prompt:{system}", question,
            lambda q: self.encode(self._render([*head, {"role": "user", "content": q}], True)))

    def user_turn_ids(self, text: str) -> list[int]:
        """Tokens appended after an assistant answer that ended with eos: a user turn saying `text` plus
        the assistant header (whatever the template puts between the two, e.g. ChatML's newline).

        Derived from the chat template itself (render with and without the user turn and take the
        difference), so it is right for any template, the tiny one and Qwen's alike.
        """
        def build(t: str) -> list[int]:
            convo = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": _SENTINEL}]
            before = self._render(convo, False)
            after = self._render([*convo, {"role": "user", "content": t}], True)
            if not after.startswith(before):
                raise ValueError("chat template does not render conversations as prefixes of each other")
            tail = before[before.rindex(_SENTINEL) + len(_SENTINEL):]
            eos_text = self.tokenizer.decode([self.eos_id])
            if not tail.startswith(eos_text):
                raise ValueError(f"chat template does not end an assistant turn with eos {eos_text!r}")
            return self.encode(tail[len(eos_text):] + after[len(before):])

        return self._memoised("user", text, build)

    @cached_property
    def feedback_ids(self) -> list[int]:
        """The feedback user turn ("Let's try again.") + assistant header, placed after a wrong answer."""
        return self.user_turn_ids(self.feedback)

    def answer_ids(self, text: str) -> list[int]:
        """A reply as the model would emit it: its tokens then eos (used for SFT targets)."""
        return self._memoised("answer", text, lambda t: [*self.encode(t), self.eos_id])

    def chat_ids(self, messages: list[Message]) -> tuple[list[int], list[int]]:
        """A multi-message chat as token ids and its loss mask: 1 on the tokens of assistant messages with
        `train` set (their content and closing eos), 0 on everything the template adds and on system and
        user turns.

        The layout is the one rollouts produce, piece by piece: prompt_ids(first user [, system]) +
        answer + user_turn_ids(next user) + answer + ... Messages: an optional system message, then user
        and assistant alternating, starting with user.
        """
        system = messages[0].content if messages and messages[0].role == "system" else None
        rest = messages[1:] if system is not None else messages
        if not rest or rest[0].role != "user":
            raise ValueError("chat_ids: a chat starts with a user message (after an optional system one)")
        ids = self.prompt_ids(rest[0].content, system)
        mask = [0] * len(ids)
        for prev, m in zip(rest, rest[1:], strict=False):
            if m.role == prev.role or m.role not in ("user", "assistant"):
                raise ValueError(f"chat_ids: {m.role!r} after {prev.role!r}; user and assistant must alternate")
            piece = self.answer_ids(m.content) if m.role == "assistant" else self.user_turn_ids(m.content)
            ids += piece
            mask += [int(m.role == "assistant" and m.train)] * len(piece)
        return ids, mask

    def sft_example(self, question: str, wrong_attempts: list[str], answer: str) -> tuple[list[int], list[int]]:
        """A (possibly multi-turn) UFO SFT conversation and its loss mask: 1 on the final answer only.

        Earlier wrong attempts are context, like the question and the feedback: the model must learn
        to answer after "Let's try again.", not to reproduce wrong answers.
        """
        messages = [Message("user", question)]
        for wrong in wrong_attempts:
            messages += [Message("assistant", wrong, train=False), Message("user", self.feedback)]
        return self.chat_ids([*messages, Message("assistant", answer)])
