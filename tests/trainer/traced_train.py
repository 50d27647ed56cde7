"""``python -m tests.trainer.traced_train train CONFIG ...``: the CLI with every collective recorded
(``collective_trace``) into ``$COLLECTIVE_TRACE_DIR``."""

import os
import runpy

from tests.trainer import collective_trace

collective_trace.install(os.environ["COLLECTIVE_TRACE_DIR"])
runpy.run_module("megatron_dispo", run_name="__main__", alter_sys=True)
