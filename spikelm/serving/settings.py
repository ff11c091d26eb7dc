"""ServeSettings: everything `spikelm serve` can be told, checked once when it is made."""

import os
import sys
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
    # either way a sequence's numbers do not depend on what else is in the batch (see engine.py)
    dtype: str = "float32"
    threads: int | None = None  # torch intra-op threads; None: torch's default
    # the engine in a process of its own (engine_process.py), so the model and the event loop do not share one
    # GIL; False: a thread of the server's process (one process, one copy of the model). Windows cannot hand
    # the child its socket (pass_fds), so there the engine stays in a thread
    engine_process: bool = sys.platform != "win32"
    e_ac_pj: float = E_AC_PJ  # energy of one accumulate (spikelm.energy)
    e_mac_pj: float = E_MAC_PJ  # energy of one multiply-accumulate
    retry_after_s: int = 1  # what a 503 tells the client to wait
    # scheduling: the tokens one engine step may process while sequences decode (one per decoding sequence, the
    # rest for prompt chunks); smaller keeps streams smoother while long prompts arrive, larger prefills them
    # faster (eval/bench_chunked_prefill.py measures both). With nothing decoding, prompts run in 2,048-token chunks
    step_tokens: int = 64
    # the prefix-state cache: prompt states kept for reuse by prompts that start the same way (0: off)
    prefix_cache_bytes: int = 64 * 2**20
    # connections and time limits
    allowed_hosts: list[str] = field(default_factory=list)  # Host names accepted besides the bound address
    # and loopback names ("*": any); binding 0.0.0.0 or :: with none named accepts any Host
    max_connections: int = 256  # uvicorn's limit_concurrency: beyond it new requests get 503
    body_read_timeout_s: float = 30.0  # a request body must arrive within this time, else 408
    stream_stall_timeout_s: float = 30.0  # a stream whose reader takes no data for this long is dropped
    shutdown_timeout_s: float = 5.0  # on shutdown, running requests get this long to finish, then an error

    def __post_init__(self):
        def need(ok, name, message):
            if not ok:
                raise SpikeLMError(f"serve: {name} {message} (got {getattr(self, name)!r})")

        for name in ("max_batch", "max_prompt_tokens", "max_tokens", "default_max_tokens", "max_body_bytes",
                     "retry_after_s", "step_tokens", "max_connections"):
            need(getattr(self, name) >= 1, name, "must be a positive integer")
        for name in ("body_read_timeout_s", "stream_stall_timeout_s"):
            need(getattr(self, name) > 0, name, "must be a positive number of seconds")
        need(self.shutdown_timeout_s >= 0, "shutdown_timeout_s", "must be 0 or more seconds")
        need(self.prefix_cache_bytes >= 0, "prefix_cache_bytes", "must be 0 (off) or more")
        need(self.max_connections > self.max_batch, "max_connections", "must be more than max_batch")
        need(self.max_queue >= 0, "max_queue", "must be 0 or more")
        need(0 <= self.port <= 65535, "port", "must be a TCP port (0 to 65535)")
        need(self.dtype in DTYPES, "dtype", f"must be one of {DTYPES}")
        need(self.threads is None or self.threads >= 1, "threads", "must be a positive integer")
        need(self.e_ac_pj >= 0 and self.e_mac_pj >= 0, "e_ac_pj", "and e_mac_pj must be non-negative")
        need(self.api_key is None or len(self.api_key) >= 1, "api_key", "must not be empty")
        self.default_max_tokens = min(self.default_max_tokens, self.max_tokens)
        if self.served_model_name is None:
            self.served_model_name = Path(self.model).resolve().name or "spikelm"
