"""Progress of a benchmark run on rank 0: a tqdm bar (the optional extra ``[bench]``) or plain lines.

Updated between measurements only (never inside a timed loop), so it costs the numbers nothing.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Optional

__all__ = ["Progress"]


class Progress:
    """``total`` steps; ``mode``: ``bar`` (tqdm), ``lines``, ``off``, or ``auto`` (a bar when tqdm is importable
    and stderr is a terminal, else lines)."""

    def __init__(self, total: int, mode: str = "auto", prefix: str = "ep_bench") -> None:
        self.total, self.prefix, self.count = total, prefix, 0
        self.t0 = time.perf_counter()
        self._bar: Optional[Any] = None
        if mode == "auto":
            mode = "bar" if _tqdm() is not None and sys.stderr.isatty() else "lines"
        if mode == "bar":
            tqdm = _tqdm()
            if tqdm is None:
                print(f"{prefix}: --progress bar needs tqdm (pip install 'megatron-ep-plugins[bench]'); "
                      "printing lines instead", flush=True)
                mode = "lines"
            else:
                self._bar = tqdm(total=total, desc=prefix, unit="run", dynamic_ncols=True, leave=True)
        self.mode = mode

    def start(self, what: str) -> None:
        """A step begins (the bar shows what is being measured)."""
        if self._bar is not None:
            self._bar.set_postfix_str(what, refresh=True)

    def done(self, what: str) -> None:
        """A step ended with ``what`` (e.g. ``T=4096 elastic: ok``)."""
        self.count += 1
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix_str(what, refresh=True)
        elif self.mode == "lines":
            print(f"{self.prefix}: [{self.count}/{self.total}, {time.perf_counter() - self.t0:.0f} s] {what}",
                  flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _tqdm() -> Optional[Any]:
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm
