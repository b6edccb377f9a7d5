"""evergreen: continual learning on Prefect, MLflow and Great Expectations."""

import os

# Arrow's C++ default memory pool is fixed when pyarrow loads. Its bundled mimalloc keeps memory
# it has freed (≈ 1.5–2.8 MB a daily-lora run in one long-lived process, docs/SCALING.md
# "Growth"), so the C library's malloc is the default here; an operator's
# ARROW_DEFAULT_MEMORY_POOL wins. `flows` imports this package first, `data_plane.readers.
# use_system_arrow_pool` covers a process that loaded pyarrow before evergreen.
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
