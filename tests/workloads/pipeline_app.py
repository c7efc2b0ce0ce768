"""A multi-stage pipeline shaped like real scientific batch work; it judges itself.

    pipeline_app.py OUTDIR INPUT STAGES DELAY

Like many real applications it refuses to start over an existing OUTDIR. It maps the
shared INPUT read-only, keeps a scratch file open in $TMPDIR (node-local), writes its log
with a plain truncating open(..., "w"), and per stage writes an intermediate file, reads
it back (holding it open across the stage's work) and deletes it. Its outputs (log.txt,
result.txt) depend only on INPUT and STAGES, never on timing or interruptions, so they
can be compared with an uninterrupted run's. Every fresh start appends one line to
OUTDIR.starts (opened and closed: not part of any image).
"""

import hashlib
import mmap
import os
import sys
import time


def main() -> int:
    out, inp_path, stages, delay = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    if os.path.exists(out):
        print(f"pipeline_app: error: output directory {out} exists; refusing to overwrite it",
              file=sys.stderr, flush=True)
        return 3
    with open(out + ".starts", "a") as f:
        f.write(f"start pid={os.getpid()}\n")
    os.makedirs(os.path.join(out, "tmp"))
    tmpdir = os.environ.get("TMPDIR", "/tmp")
    scratch = open(os.path.join(tmpdir, f"scratch-{os.getpid()}.bin"), "w+b")
    log = open(os.path.join(out, "log.txt"), "w")
    with open(inp_path, "rb") as f:
        data = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    h = hashlib.sha256(b"seed")
    for i in range(stages):
        chunk = data[(i * 4096) % len(data):][:65536]
        inter = os.path.join(out, "tmp", f"stage_{i}.dat")
        with open(inter, "wb") as w:
            for _ in range(4):
                w.write(hashlib.sha256(h.digest() + chunk).digest() * 2048)
        held = open(inter, "rb")
        time.sleep(delay)  # the stage's work, with its intermediate open
        h.update(held.read())
        held.close()
        os.unlink(inter)
        scratch.seek(i * 32)
        scratch.write(h.digest())
        scratch.flush()
        scratch.seek(0)
        if scratch.read() != b"".join(_replay(data, i + 1)):
            print(f"pipeline_app: error: scratch file lost its content at stage {i}", file=sys.stderr)
            return 4
        log.write(f"stage {i} {h.hexdigest()[:16]}\n")
        log.flush()
    log.close()
    with open(os.path.join(out, "result.txt"), "w") as f:
        f.write(h.hexdigest() + "\n")
    print(f"result={h.hexdigest()}", flush=True)
    return 0


def _replay(data, stages):
    """The digests after each stage, recomputed from INPUT alone (the scratch's truth)."""
    h = hashlib.sha256(b"seed")
    for i in range(stages):
        chunk = data[(i * 4096) % len(data):][:65536]
        content = b"".join(hashlib.sha256(h.digest() + chunk).digest() * 2048 for _ in range(4))
        h.update(content)
        yield h.digest()


if __name__ == "__main__":
    sys.exit(main())
