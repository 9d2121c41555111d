"""Where a shard's bytes come from: local paths and URLs, opened through webdataset's `gopen`.

A shard location is what the index lists (`path`, relative to the index's folder, or itself a
URL), optionally mapped by the config template data.shard_url ("{path}" = the index's entry):

    data/cifar100/train/train-000003.tar             local path (relative: to the index's folder)
    file:/datasets/cifar100/train/train-000003.tar   local file
    https://host/cifar100/train/train-000003.tar     HTTP(S) (read with urllib: Range and status, remote.py)
    pipe:aws s3 cp s3://bucket/cifar100/train/train-000003.tar -     any command writing the tar

Why webdataset's openers: they are what users of WebDataset already configure (`pipe:` for object
stores, GOPEN_REWRITE, USE_AIS_FOR), so a shard set that streams into webdataset streams here.

Local files (plain paths and file:) are opened here (`open_shard`) and come back seekable, and the
reader uses that: a worker skips the members it does not need with a seek instead of reading them
(reader.py). Every other location is read through remote.py's `RemoteStream` (retried, resumed and
hashed), a forward-only stream walked with webdataset's tar iteration.

Opening errors are not bad data: a shard that cannot be opened is a configuration or
infrastructure problem, so the probe (probe.py, run when the index is loaded) and `open_shard`
raise one line naming the location, what failed (curl's exit code spelled out) and what to check.
"""
from __future__ import annotations

import os
import re
from typing import Optional
from urllib.parse import urlparse
from urllib.request import url2pathname

import importlib

# the module, not the function webdataset's __init__ exports under the same name
wds_gopen = importlib.import_module("webdataset.gopen")

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")
_CURL_EXIT = {6: "could not resolve the host", 7: "could not connect to the server",
              22: "the server answered with an HTTP error (e.g. 404 not found)", 28: "timed out",
              35: "TLS handshake failed", 52: "the server sent nothing", 56: "the connection broke"}


class ShardOpenError(ValueError):
    """A shard location cannot be opened (ValueError: reported as one `error:` line by the launcher)."""


def scheme(location: str) -> str:
    """'' for a plain path, else the URL scheme ('file', 'http', 'pipe', ...). One-letter schemes
    are not schemes (they would be Windows drive letters)."""
    m = _SCHEME_RE.match(location)
    return m.group(1).lower() if m else ""


def check_scheme(location: str, where: str) -> None:
    """ValueError when webdataset has no opener for the location's scheme (e.g. s3://)."""
    s = scheme(location)
    if s in ("", "file") or s in wds_gopen.gopen_schemes:
        return
    known = sorted(k for k in wds_gopen.gopen_schemes if not k.startswith("_"))
    raise ShardOpenError(f"{where}: shard location {location!r} has scheme {s!r}, which webdataset cannot open "
                         f"(it opens plain paths, file:, {', '.join(known)}); for object stores use a pipe, "
                         f"e.g. 'pipe:aws s3 cp s3://bucket/{{path}} -' as data.shard_url")


def local_path(location: str) -> Optional[str]:
    """The file path of a local location (plain path or file: URL), None for any other URL."""
    s = scheme(location)
    if s == "":
        return location
    if s == "file":
        return url2pathname(urlparse(location).path)  # as gopen opens it
    return None


def resolve(root: str, entry: str, template: str = "") -> str:
    """Location of one index entry: the template with {path} replaced (data.shard_url), else the
    entry itself when it is a URL, else the entry joined to the index's folder `root`."""
    if template:
        return template.replace("{path}", entry)
    if scheme(entry):
        return entry
    if scheme(root):  # the index's folder is a URL (an index read over HTTP)
        return root.rstrip("/") + "/" + entry
    return os.path.normpath(os.path.join(root, entry))


def check_template(template: str) -> None:
    if template and "{path}" not in template:
        raise ValueError(f"config field 'data.shard_url' = {template!r} has no '{{path}}'; it maps each "
                         f"shard path of the index to a location, e.g. 'https://host/cifar100/{{path}}' or "
                         f"'pipe:aws s3 cp s3://bucket/cifar100/{{path}} -'")


def exit_reason(pipe, status: Optional[int]) -> str:
    """What a subprocess opener's exit status means (curl's spelled out)."""
    args = pipe.args[0][0]
    if isinstance(args, list) and args and args[0] == "curl" and status in _CURL_EXIT:
        return f"curl exit {status}: {_CURL_EXIT[status]}"
    if isinstance(args, str) and args.lstrip().startswith("curl ") and status in _CURL_EXIT:
        return f"command exit status {status} (curl: {_CURL_EXIT[status]})"
    return f"command exit status {status}"


def _why(stream, err: Optional[BaseException]) -> str:
    """What failed, with a pipe's exit status (curl's spelled out) when the opener is a subprocess."""
    if isinstance(stream, wds_gopen.Pipe):
        try:
            stream.close()
        except Exception:  # noqa: BLE001 - the status is what we want, the exception only repeats it
            pass
        status = stream.status
        if status not in (None, 0, 141):
            reason = exit_reason(stream, status)
            return reason + (f" ({err})" if err and "exit" not in str(err) and "curl" not in reason else "")
    if err is not None:
        return f"{type(err).__name__}: {err}"
    return "no data"


def open_shard(location: str):
    """A readable binary stream of the shard through webdataset's gopen (seekable for local files;
    the reader opens remote locations with remote.RemoteStream instead). ShardOpenError if the
    opener itself fails (missing file, unknown scheme); a stream that gives no tar is reported
    through `open_failure`."""
    check_scheme(location, "shard")
    try:
        return wds_gopen.gopen(location, "rb")
    except Exception as e:  # noqa: BLE001 - gopen raises OSError, ValueError, ...: name the URL instead
        raise ShardOpenError(f"cannot open shard {location!r}: {type(e).__name__}: {e}; check the index "
                             f"entry and data.shard_url") from None


def open_failure(location: str, stream, err: Optional[BaseException]) -> ShardOpenError:
    """The error for a stream that gave no tar at all (empty stream, failed command or download)."""
    if scheme(location) == "pipe":
        test = f"`{location[5:]} | tar t`"
    elif local_path(location) is None:
        test = f"`curl -fsSL {location} | tar t`"
    else:
        test = f"`tar tf {local_path(location)}`"
    return ShardOpenError(f"cannot open shard {location!r}: {_why(stream, err)}; check that {test} works "
                          f"and the index entry / data.shard_url")
