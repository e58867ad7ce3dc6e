"""Write-to-a-temporary-then-rename, so a file or folder under its final name is either
complete or absent: a kill mid-write leaves only a temporary behind.

    python -m pytest tests/test_faults.py -q
"""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager


@contextmanager
def atomic_dir(final: str, tmp: str, replace: bool = False):
    """Yield the temporary folder `tmp` (emptied first); on success rename it to `final`.
    An existing `final` is removed first when `replace` (it must otherwise be absent or empty).
    On an error the temporary is removed and the error propagates."""
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        if os.path.isdir(final):
            if replace:
                shutil.rmtree(final)
            else:
                os.rmdir(final)  # empty by contract: fails loudly otherwise
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text(path: str, text: str, encoding: str = "utf-8") -> None:
    """Replace the file at `path` with `text` in one rename."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding=encoding) as f:
        f.write(text)
    os.replace(tmp, path)
