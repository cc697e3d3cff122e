"""Tokenizer and chat format: the locally built character tokenizer of the tiny default, and the
token-level pieces every stage uses to build conversations.

Conversations are built as token ids piece by piece (prompt, sampled answer, feedback turn, ...),
never by re-tokenising decoded text: RL must train on exactly the ids that were sampled, and a decode
→ encode round trip can silently change them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
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

    def prompt_ids(self, question: str) -> list[int]:
        """The first user turn plus the assistant header: what the model answers at turn 0."""
        return self._memoised(
            "prompt", question, lambda q: self.encode(self._render([{"role": "user", "content": q}], True)))

    @cached_property
    def feedback_ids(self) -> list[int]:
        """Tokens appended after an answer that ended with eos: the feedback user turn + assistant header.

        Derived from the chat template itself (render with and without the feedback turn and take the
        difference), so it is right for any template, the tiny one and Qwen's alike.
        """
        convo = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": _SENTINEL}]
        before = self._render(convo, False)
        after = self._render([*convo, {"role": "user", "content": self.feedback}], True)
        if not after.startswith(before):
            raise ValueError("chat template does not render conversations as prefixes of each other")
        tail = before[before.rindex(_SENTINEL) + len(_SENTINEL):]
        eos_text = self.tokenizer.decode([self.eos_id])
        if not tail.startswith(eos_text):
            raise ValueError(f"chat template does not end an assistant turn with eos {eos_text!r}")
        return self.encode(tail[len(eos_text):] + after[len(before):])

    def answer_ids(self, text: str) -> list[int]:
        """A reply as the model would emit it: its tokens then eos (used for SFT targets)."""
        return self._memoised("answer", text, lambda t: [*self.encode(t), self.eos_id])

    def sft_example(self, question: str, wrong_attempts: list[str], answer: str) -> tuple[list[int], list[int]]:
        """A (possibly multi-turn) SFT conversation and its loss mask: 1 on the final answer only.

        Earlier wrong attempts are context, like the question and the feedback: the model must learn
        to answer after "Let's try again.", not to reproduce wrong answers.
        """
        ids = self.prompt_ids(question)
        mask = [0] * len(ids)
        for wrong in wrong_attempts:
            piece = self.answer_ids(wrong) + self.feedback_ids
            ids += piece
            mask += [0] * len(piece)
        final = self.answer_ids(answer)
        return ids + final, mask + [1] * len(final)
