"""ServeSettings: everything `spikelm serve` can be told, checked once when it is made."""

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..energy import E_AC_PJ, E_MAC_PJ
from ..errors import SpikeLMError

DTYPES = ("float64", "float32")


@dataclass
class ServeSettings:
    model: str  # a saved spikelm model + tokenizer: a directory or a hub id
    revision: str | None = None  # of a hub id: branch, tag or commit
    served_model_name: str | None = None  # the name clients send as `model`; default: the directory's name
    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = 8000
    api_key: str | None = field(default_factory=lambda: os.environ.get("SPIKELM_API_KEY") or None)
    max_batch: int = 32  # sequences whose decode steps run together
    max_queue: int = 64  # requests waiting for a slot; beyond it: 503 with Retry-After
    max_prompt_tokens: int = 2048
    max_tokens: int = 512  # most tokens one request may generate
    default_max_tokens: int = 128  # for chat requests that name no max_tokens
    max_body_bytes: int = 1_000_000
    # float64: a sequence's numbers do not depend on what else is in the batch (see engine.py)
    dtype: str = "float64"
    threads: int | None = None  # torch intra-op threads; None: torch's default
    e_ac_pj: float = E_AC_PJ  # energy of one accumulate (spikelm.energy)
    e_mac_pj: float = E_MAC_PJ  # energy of one multiply-accumulate
    retry_after_s: int = 1  # what a 503 tells the client to wait

    def __post_init__(self):
        def need(ok, name, message):
            if not ok:
                raise SpikeLMError(f"serve: {name} {message} (got {getattr(self, name)!r})")

        for name in ("max_batch", "max_prompt_tokens", "max_tokens", "default_max_tokens", "max_body_bytes",
                     "retry_after_s"):
            need(getattr(self, name) >= 1, name, "must be a positive integer")
        need(self.max_queue >= 0, "max_queue", "must be 0 or more")
        need(0 <= self.port <= 65535, "port", "must be a TCP port (0 to 65535)")
        need(self.dtype in DTYPES, "dtype", f"must be one of {DTYPES}")
        need(self.threads is None or self.threads >= 1, "threads", "must be a positive integer")
        need(self.e_ac_pj >= 0 and self.e_mac_pj >= 0, "e_ac_pj", "and e_mac_pj must be non-negative")
        need(self.api_key is None or len(self.api_key) >= 1, "api_key", "must not be empty")
        self.default_max_tokens = min(self.default_max_tokens, self.max_tokens)
        if self.served_model_name is None:
            self.served_model_name = Path(self.model).resolve().name or "spikelm"
