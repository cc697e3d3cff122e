"""What every pod of a stage's Kubernetes Job runs (infra/work-pools/kubernetes.json):

    python -m flows.node prefect flow-run execute

A stage on several nodes is one Indexed Job of `flow.<stage>.resources.nodes` pods, all started from one
pod template with one command. Only node 0 may execute the Prefect flow run: it runs the stage as on one
machine (flows/stage_flow.py) and alone reports the run's state. Were every pod to execute it, the first
node to finish would mark the run Completed while node 0 was still logging the stage's Output. So this
entrypoint hands node 0 the worker's command unchanged and starts every other node's stage directly,
`python -m stages.<stage> ARGS` from the environment the deployment launcher set (`FOLLOW_STAGE_ENV`,
`FOLLOW_ARGS_ENV`): that stage follows node 0's job from the MLflow run (stages/common/rank.py). A
one-node stage (completion index 0) is the worker's command, as without this file.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping

from stages.common.processes import NODE_RANK_ENV

#: Set by the deployment launcher on a multi-node stage's pods: the stage a node other than 0 runs, and
#: its command-line arguments as a JSON list (`StageJob.args()`: the config inline, the MLflow run ids).
FOLLOW_STAGE_ENV, FOLLOW_ARGS_ENV = "UFO_STAGE", "UFO_STAGE_ARGS"


def node_command(argv: list[str], env: Mapping[str, str]) -> list[str]:
    """The command this pod runs: `argv` (the worker's flow-run command) on node 0, the stage on the others."""
    rank = int(env.get(NODE_RANK_ENV) or 0)
    if rank == 0:
        if not argv:
            raise SystemExit("flows.node: no command given (the work pool's job template passes the worker's)")
        return list(argv)
    missing = [k for k in (FOLLOW_STAGE_ENV, FOLLOW_ARGS_ENV) if not env.get(k)]
    if missing:
        raise SystemExit(f"flows.node: this pod is node {rank}, but {' and '.join(missing)} are not set: a stage on "
                         "several nodes is started by the deployment launcher (flow.<stage>.resources.nodes), which "
                         "sets them")
    return [sys.executable, "-m", f"stages.{env[FOLLOW_STAGE_ENV]}", *json.loads(env[FOLLOW_ARGS_ENV])]


def main() -> None:
    cmd = node_command(sys.argv[1:], os.environ)
    os.execvp(cmd[0], cmd)  # the pod's main process is the command itself: Kubernetes' signals reach it


if __name__ == "__main__":
    main()
