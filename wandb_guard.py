"""W&B that never costs a run: a missing login is refused before anything is loaded, and any
later W&B failure (network, permissions, a full disk under wandb/) warns once and goes on
offline, or without W&B if even that fails. The local iter_log.jsonl is written before W&B
sees a step, so it is never lost to a W&B error."""
from __future__ import annotations

import copy
import logging
import os

from distributed import first_line
from runtime import log_wandb, start_wandb

log = logging.getLogger("ireasoner")


def login_problem(cfg) -> str | None:
    """Why --wandb_mode online cannot log in, or None. Credentials (WANDB_API_KEY, ~/.netrc from
    `wandb login`) are looked up without prompting and without the network, so this runs
    before any model is loaded."""
    if cfg.wandb_mode != "online":
        return None
    try:
        import wandb
        if wandb.login(prompt=False, verify=False):
            return None
        why = "--wandb_mode online needs a W&B login"
    except Exception as e:  # noqa: BLE001 -- e.g. a malformed key: W&B's own words, one line
        why = f"W&B login failed ({first_line(e)})"
    return (f"{why}: run `wandb login` (or set WANDB_API_KEY), or pass --wandb_mode offline "
            f"(upload later with `wandb sync`)")


class Tracker:
    """The trainer's W&B run: a failure warns and goes on offline; offline failing too, without W&B."""

    def __init__(self, cfg, run_name: str, run_dir: str, st):
        self.cfg, self.name, self.dir, self.st = cfg, run_name, run_dir, st
        self.run, self.failed = None, False
        try:
            self.run = start_wandb(cfg, run_name, run_dir, st)
        except Exception as e:  # noqa: BLE001 -- see _guard
            self._fall_back("start", e)

    def log(self, records: list[dict]) -> None:
        if self.run is not None:
            self._guard("log", lambda: log_wandb(self.run, records, self.cfg.wandb_log_images_every))

    def log_data(self, data: dict, step: int) -> None:
        if self.run is not None:
            self._guard("log", lambda: self.run.log(data, step=step))

    def alert(self, title: str, text: str) -> None:
        """A W&B alert (offline runs record none; the warning is in the log either way)."""
        if self.run is not None:
            import wandb
            self._guard("alert", lambda: self.run.alert(title=title, text=text,
                                                        level=wandb.AlertLevel.WARN))

    def finish(self) -> None:
        if self.run is not None:
            self._guard("finish", self.run.finish)

    def _guard(self, what: str, call) -> None:
        try:
            call()
        except Exception as e:  # noqa: BLE001 -- W&B's errors are many and version-dependent
            self._fall_back(what, e)

    def _fall_back(self, what: str, error: Exception) -> None:
        """An online run is reopened offline (same id: `wandb sync` merges it), with one warning;
        if offline W&B fails as well, W&B is dropped, with one more."""
        old, self.run = self.run, None
        if old is not None:
            try:
                old.finish(quiet=True)
            except Exception:  # noqa: BLE001 -- the run is broken already
                pass
        local = os.path.join(self.dir, "iter_log.jsonl")
        if self.failed or self.cfg.wandb_mode != "online":
            log.warning("W&B %s failed (%s); going on without W&B (the local log %s has every "
                        "step)", what, first_line(error), local)
            return
        self.failed = True
        log.warning("W&B %s failed (%s); going on offline under %s (upload later with `wandb "
                    "sync`; the local log %s has every step)", what, first_line(error),
                    os.path.join(self.dir, "wandb"), local)
        offline = copy.copy(self.cfg)  # the run's own config (saved in checkpoints) stays as given
        offline.wandb_mode = "offline"
        try:
            self.run = start_wandb(offline, self.name, self.dir, self.st)
        except Exception as e:  # noqa: BLE001
            log.warning("W&B offline failed too (%s); going on without W&B", first_line(e))
