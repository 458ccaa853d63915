"""The status of a run that raised: "OOM", "compile failed" (torch.compile of naive) or "failed",
with a one-line message; what a benchmark cell says instead of crashing."""
from __future__ import annotations


def classify(exc, name=None):
    """(status, message) for an exception raised by a run."""
    msg = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    text = str(exc)
    oom = (isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"
           or "can't allocate memory" in text or "out of memory" in text.lower()
           or "ALLOC_FAILED" in text or "std::bad_alloc" in text or "Cannot allocate memory" in text)
    if oom:
        return "OOM", msg
    mod = type(exc).__module__ or ""
    if name == "compiled" and ("_dynamo" in mod or "_inductor" in mod or "Compil" in type(exc).__name__
                               or "Unsupported" in type(exc).__name__):
        return "compile failed", f"{type(exc).__name__}: {msg}"
    return "failed", f"{type(exc).__name__}: {msg}"
