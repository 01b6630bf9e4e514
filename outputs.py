"""
Output safety, the one rule for every file a script writes (checkpoints, --json, --save, run_paper's
folder): an output is complete or absent, never replaces anything without --overwrite, and is never
an input of any kind; a signal or an error leaves no debris, and results files hold no NaN.

  - check_not_input / check_output / check_output_file: refused before any work;
  - write_output_file: a results file, whole or not at all (a temporary sibling, then one link or
    one atomic replace);
  - publish: a finished temporary folder becomes the output in one rename (renameat2: without
    --overwrite nothing is ever replaced, with it the old output is swapped out atomically);
  - remove_stale_temps: the temporary folders of runs that were killed (SIGKILL cannot be handled);
  - staged_folder: a folder's files made in a temporary sibling, copied into it, each whole, at the end.

Every refusal raises OutputError with a one-line message naming the path.
"""

import contextlib
import ctypes
import errno
import json
import math
import os
import shutil
import tempfile


class OutputError(Exception):
    """An output that may not be written (a one-line message for the user)."""


def same_place(a: str, b: str) -> bool:
    """Whether two paths name the same file system object, however spelled (symlinks, .., aliases)."""
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def check_not_input(path: str, inputs=()):
    """Refuse an output that is an input (a checkpoint, a token or text file, however spelled), lies
    inside an input folder (a file of a checkpoint), or contains an input (which --overwrite would
    delete). inputs: paths, None for an input that is not a file (e.g. 'stdlib')."""
    real_out = os.path.realpath(path)
    for src in inputs:
        if not src:
            continue
        if same_place(path, src):
            raise OutputError(f"{path} is the input {src}; choose another output")
        if not os.path.lexists(src):
            continue
        real_src = os.path.realpath(src)
        if os.path.isdir(src) and real_out.startswith(real_src + os.sep):
            raise OutputError(f"{path} lies inside the input {src}; choose another output")
        if os.path.lexists(path) and real_src.startswith(real_out + os.sep):
            raise OutputError(f"{path} contains the input {src}; choose another output")


def check_output(path: str, overwrite: bool = False, inputs=()):
    """Refuse, before any work, an output folder that is, holds or lies in an input (check_not_input),
    that exists without overwrite, or whose folder cannot be written."""
    check_not_input(path, inputs)
    if os.path.lexists(path) and not overwrite:
        raise OutputError(f"{path} exists (pass --overwrite to replace it)")
    ancestor = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise OutputError(f"cannot create {path}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"cannot create {path}: no permission to write in {ancestor}")


def check_output_file(path: str, overwrite: bool = False, inputs=()):
    """Refuse, before any work, a results file (--json) that is or lies in an input (check_not_input),
    names a folder, lies in a missing folder, or exists without overwrite."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise OutputError(f"{path} is a directory; name a file")
    check_not_input(path, inputs)
    if not os.path.isdir(folder):
        raise OutputError(f"{path}: folder {folder} does not exist")
    if os.path.lexists(path) and not overwrite:
        raise OutputError(f"{path} exists (pass --overwrite to replace it)")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"cannot create {path}: no permission to write in {folder}")


def finite_json(obj):
    """obj with every non-finite float replaced by a string saying so ("not finite (nan)"): JSON has
    no NaN or Infinity, and a results file must say what a value is rather than hold a non-number."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return f"not finite ({obj})"
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def json_text(obj) -> str:
    """A results file's text: indented JSON, non-finite values spelled out (finite_json)."""
    return json.dumps(finite_json(obj), indent=2, allow_nan=False)


def write_output_file(path: str, text, overwrite: bool = False):
    """Write a results file (text, or bytes) whole or not at all: a temporary sibling, then one link
    (which fails if path appeared meanwhile) or, with overwrite, one atomic replace."""
    check_output_file(path, overwrite)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".tmp-", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "wb" if isinstance(text, bytes) else "w") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~umask())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise OutputError(f"{path} appeared while this run was writing it; left as it is") from None
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


class GrowingFile:
    """A results file saved again after each step of a long run, so that a run stopped by a time
    limit keeps every figure measured before it. The first save follows the rule of every output
    (checked before any work, as check_output_file); later ones replace only this run's own file."""

    def __init__(self, path: str, overwrite: bool = False, inputs=()):
        check_output_file(path, overwrite, inputs)
        self.path, self.overwrite = path, overwrite

    def save(self, obj):
        write_output_file(self.path, json_text(obj), self.overwrite)
        self.overwrite = True  # from now on the file is this run's own


def umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


_libc = ctypes.CDLL(None, use_errno=True)
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2  # renameat2(2) flags (Linux 3.15+)


def rename2(src: str, dst: str, flags: int):
    """renameat2(src, dst, flags): NOREPLACE fails with EEXIST instead of replacing dst (plain
    rename silently replaces an empty directory); EXCHANGE swaps the two atomically."""
    fn = getattr(_libc, "renameat2", None)
    if fn is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    AT_FDCWD = -100
    if fn(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), dst)


def remove(path: str):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def publish(tmp: str, path: str, overwrite: bool):
    """Make the finished folder tmp the output at path. Without overwrite nothing is ever replaced,
    not even a folder created at path during the run; with overwrite the old output is swapped out
    in one atomic exchange and then deleted. Falls back to plain renames where renameat2 is missing."""
    try:
        rename2(tmp, path, RENAME_NOREPLACE)
        return
    except OSError as e:
        if e.errno == errno.EEXIST and not overwrite:
            raise OutputError(f"{path} appeared while this run was writing it (another run?); it was left "
                                  f"as it is and this run's output discarded") from None
        if e.errno == errno.EEXIST:
            try:
                rename2(tmp, path, RENAME_EXCHANGE)
                remove(tmp)  # tmp now holds the old output
                return
            except OSError as e2:
                if e2.errno not in (errno.ENOSYS, errno.EINVAL):
                    raise
        elif e.errno not in (errno.ENOSYS, errno.EINVAL):
            raise
    if os.path.lexists(path):  # no renameat2 here: the old output moves aside for a moment
        if not overwrite:
            raise OutputError(f"{path} appeared while this run was writing it (another run?); it was left "
                                  f"as it is and this run's output discarded")
        old = f"{tmp}-old"
        os.rename(path, old)
        os.rename(tmp, path)
        remove(old)
    else:
        os.mkdir(path)  # atomic: fails if anything appeared meanwhile
        for fn in os.listdir(tmp):
            os.rename(os.path.join(tmp, fn), os.path.join(path, fn))
        os.rmdir(tmp)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(parent: str, base: str):
    """Delete BASE.tmp-PID-* folders left by runs that were killed (SIGKILL cannot be handled):
    their process no longer exists."""
    prefix = base + ".tmp-"
    for fn in os.listdir(parent):
        pid = fn[len(prefix):].split("-", 1)[0]
        if fn.startswith(prefix) and pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            remove(os.path.join(parent, fn))


@contextlib.contextmanager
def staged_folder(out: str, overwrite: bool = False):
    """Yields a temporary sibling OUT.tmp-PID-XXXX to make a folder's files in (removed on any error
    or signal, and by the next run if this one is killed); when the block ends without an error, its
    files are copied into out, file by file, each whole, replacing one only with overwrite."""
    parent, base = os.path.split(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    remove_stale_temps(parent, base)
    stage = tempfile.mkdtemp(prefix=f"{base}.tmp-{os.getpid()}-", dir=parent)
    try:
        yield stage
        os.makedirs(out, exist_ok=True)
        for fn in sorted(os.listdir(stage)):  # the finished files
            if os.path.isfile(os.path.join(stage, fn)):
                with open(os.path.join(stage, fn), "rb") as f:
                    write_output_file(os.path.join(out, fn), f.read(), overwrite)
    finally:
        remove(stage)
