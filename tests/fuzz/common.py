"""What every fuzz target shares: the finding rule, the hang timer, small fakes.

Only ``csi_oci.errors`` is imported here (before atheris instruments the
rest), so the code under test is imported, and instrumented, by the target
modules themselves.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from csi_oci.errors import CsiOciError

REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE = REPO_ROOT / ".cache"
SEEDS_ROOT = CACHE / "fuzz-seeds"
REGRESSIONS = Path(__file__).resolve().parent / "regressions"

FINDING_MARK = "CSI-OCI-FUZZ-FINDING "
KNOWN_ENV = "CSI_OCI_FUZZ_KNOWN"  # a file of finding signatures to let pass (one a line)
HANG_ENV = "CSI_OCI_FUZZ_HANG_SECONDS"  # per-input CPU seconds before it is a hang
DICT_DIR_ENV = "CSI_OCI_FUZZ_DICT_DIR"  # where a child writes its target's -dict file
SCRATCH_ENV = "CSI_OCI_FUZZ_SCRATCH"  # a directory the runner removes after the child
DEFAULT_HANG_SECONDS = 5.0

T = TypeVar("T")


class Hang(BaseException):
    """One input used more CPU than any parse of a bounded input should.

    A BaseException, so the code under test cannot swallow it in an
    ``except Exception``; raised from a SIGPROF handler, so the traceback
    says where the time went.
    """


class ContainmentError(AssertionError):
    """The code under test wrote outside the directory it was given."""


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def scratch_root() -> str | None:
    """Where targets make their scratch directories: the runner's (removed after the
    child: libFuzzer exits without running Python's cleanup), else tmpfs, else /tmp."""
    root = os.environ.get(SCRATCH_ENV)
    if root:
        return root
    return "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


def attempt(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
    """Call a step of a target; an expected refusal (CsiOciError) is None."""
    try:
        return fn(*args, **kwargs)
    except CsiOciError:
        return None


# -- the finding rule -----------------------------------------------------------------


def _where(frame: traceback.FrameSummary) -> str:
    path = frame.filename
    try:
        path = str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        path = Path(path).name  # the standard library or a dependency
    return f"{path}:{frame.lineno} ({frame.name})"


def location(exc: BaseException) -> str:
    """Where an exception was raised: the innermost frame in csi_oci, and the innermost
    frame of all when that is elsewhere (tarfile, json, ...), so distinct causes that
    leak through one csi_oci line stay distinct findings."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "?"
    ours = [f for f in frames if "/csi_oci/" in f.filename.replace(os.sep, "/")]
    if not ours:
        return _where(frames[-1])
    text = _where(ours[-1])
    if frames[-1] is not ours[-1]:
        text += f" via {_where(frames[-1])}"
    return text


def signature(exc: BaseException) -> str:
    return f"{type(exc).__name__} at {location(exc)}"


def classify(exc: BaseException) -> str:
    if isinstance(exc, Hang):
        return "hang"
    if isinstance(exc, MemoryError):
        return "memory"
    if isinstance(exc, ContainmentError):
        return "containment"
    return "exception"


def _known() -> set[str]:
    path = os.environ.get(KNOWN_ENV)
    if not path or not os.path.exists(path):
        return set()
    return {line.strip() for line in Path(path).read_text().splitlines() if line.strip()}


def _on_sigprof(signum: int, frame: Any) -> None:
    raise Hang(f"input used more than {hang_seconds()} s of CPU")


def hang_seconds() -> float:
    return float(os.environ.get(HANG_ENV, DEFAULT_HANG_SECONDS))


def guarded(target: Callable[[bytes], None]) -> Callable[[bytes], None]:
    """The libFuzzer entry point around a target: what is not a finding returns.

    A finding is re-raised (atheris reports it and writes the input) after a
    one-line JSON record on stderr that the runner reads; a finding whose
    signature the runner already knows (CSI_OCI_FUZZ_KNOWN) is let pass, so a
    long run goes on looking for other ones.
    """
    known = _known()
    limit = hang_seconds()
    signal.signal(signal.SIGPROF, _on_sigprof)

    def one_input(data: bytes) -> None:
        signal.setitimer(signal.ITIMER_PROF, limit)
        try:
            target(data)
        except CsiOciError:
            pass
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:
            sig = signature(exc)
            if sig in known:
                return
            record = {
                "kind": classify(exc),
                "signature": sig,
                "exception": type(exc).__name__,
                "message": str(exc)[:300],
            }
            sys.stderr.write(FINDING_MARK + json.dumps(record) + "\n")
            sys.stderr.flush()
            raise
        finally:
            signal.setitimer(signal.ITIMER_PROF, 0)

    return one_input


def _on_sigalrm(signum: int, frame: Any) -> None:
    raise Hang(f"input took more than {wall_seconds()} s (wall clock)")


def wall_seconds() -> float:
    return max(30.0, 6 * hang_seconds())


def outcome(target: Callable[[bytes], None], data: bytes) -> tuple[str, str]:
    """Replay one input: ("ok" | "refused" | "finding", detail). Never raises.

    Besides the CPU timer, a wall-clock one (libFuzzer's -timeout plays that
    part while fuzzing) catches an input that blocks or sleeps.
    """
    signal.signal(signal.SIGPROF, _on_sigprof)
    signal.signal(signal.SIGALRM, _on_sigalrm)
    signal.setitimer(signal.ITIMER_PROF, hang_seconds())
    signal.setitimer(signal.ITIMER_REAL, wall_seconds())
    try:
        target(data)
    except CsiOciError as exc:
        return "refused", f"{type(exc).__name__}: {str(exc)[:200]}"
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        text = "".join(traceback.format_exception(exc))
        return "finding", f"{signature(exc)}\n{text}"
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.setitimer(signal.ITIMER_REAL, 0)
    return "ok", ""


def write_dict(tokens: list[bytes], path: Path) -> Path:
    """A libFuzzer -dict file of ``tokens``."""
    lines = []
    for token in tokens:
        escaped = "".join(
            chr(b) if 32 <= b < 127 and b not in (34, 92) else f"\\x{b:02x}" for b in token
        )
        lines.append(f'"{escaped}"')
    path.write_text("\n".join(lines) + "\n")
    return path


# -- fakes ------------------------------------------------------------------------------


def response(status: int, body: bytes, headers: dict[str, str] | None = None) -> Any:
    """A requests.Response as a stream=True request leaves it: the body unread, in a urllib3
    HTTPResponse (``raw``), so code that reads ``raw`` itself sees what it sees in production."""
    import requests
    import urllib3
    from requests.structures import CaseInsensitiveDict

    resp = requests.Response()
    resp.status_code = status
    resp.headers = CaseInsensitiveDict(headers or {})
    resp.raw = urllib3.response.HTTPResponse(
        body=io.BytesIO(body),
        headers=dict(resp.headers),
        status=status,
        preload_content=False,
        decode_content=False,
    )
    resp.url = "http://registry.fuzz.invalid/v2/"
    resp.reason = "fuzz"
    return resp


def split(data: bytes, parts: int, sep: bytes = b"\x00") -> list[bytes]:
    """``data`` cut at the first ``parts - 1`` separators (missing parts are empty)."""
    out = data.split(sep, parts - 1)
    return out + [b""] * (parts - len(out))
