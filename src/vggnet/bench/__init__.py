"""The benchmark wing: how fast vggnet runs, against torchvision and this machine's own ceilings.

`timing` measures (interleaved rounds, matmul ceilings, peak memory, the machine), `sections` says
what is timed (the functions users run: vggnet.evaluate, vggnet.engines, vggnet.train.train_step),
`report` turns a run into the summary, the targets of the machine's hardware class and Markdown.
`vggnet bench` (vggnet.cli.bench_cmd) is a thin entry over `run_benchmark` and `format_markdown`.
"""

from .report import COMMON_TARGETS, TARGETS, format_markdown, summarize
from .sections import (FULL, QUICK, SECTIONS, BenchPlan, bench_inference, bench_multicrop, bench_pipeline,
                       bench_training, default_workers, precision_agreement, profile_inference, run_benchmark)
from .timing import machine_info, matmul_ceiling, time_interleaved

__all__ = ["BenchPlan", "FULL", "QUICK", "SECTIONS", "TARGETS", "COMMON_TARGETS", "run_benchmark", "summarize",
           "format_markdown", "machine_info", "matmul_ceiling", "time_interleaved", "bench_inference",
           "bench_training", "bench_pipeline", "bench_multicrop", "profile_inference", "precision_agreement",
           "default_workers"]
