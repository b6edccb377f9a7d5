"""evergreen: continual learning on Prefect, MLflow and Great Expectations."""

import os

# Arrow's C++ default memory pool is fixed when pyarrow loads. Its bundled mimalloc keeps memory
# it has freed (≈ 1.5–2.8 MB a daily-lora run in one long-lived process, docs/SCALING.md
# "Growth"), so the C library's malloc is the default here; an operator's
# ARROW_DEFAULT_MEMORY_POOL wins. `flows` imports this package first, `data_plane.readers.
# use_system_arrow_pool` covers a process that loaded pyarrow before evergreen.
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")

# Loading a Hugging Face model draws a "Loading weights" progress bar on stderr, once per load
# (several per text run: champion, challenger, serving check). In a CLI run, a worker's flow-run
# log or a CI log it is noise between the lines that matter; HF_HUB_DISABLE_PROGRESS_BARS=0
# brings the bars back.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
