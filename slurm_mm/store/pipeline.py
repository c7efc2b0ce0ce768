"""Moving chunked image files at the disk's speed: a parallel, ordered writer and a
parallel, checked reader.

Writing (commit): worker threads read and encode chunks (compress or not, hash) in
parallel; one writer thread writes them in file order, so each stored file is written
sequentially once; a verifier thread syncs what was written every SYNC_BYTES (so the final
sync waits only for the tail) and then reads those chunks back through a second file
descriptor and checks each against the hash of the buffer that was written. With
read_back="cache" writes are buffered and the read may be served from the page cache (as
a restore on the same node would be). With "device", whole raw chunks at aligned offsets
are written with O_DIRECT straight from the page-aligned buffer they were read and hashed
in, and every chunk is read back with O_DIRECT, so the read comes from the storage
itself and neither pass copies through the page cache (measured: the buffered write and
its writeback cost more CPU than all the rest of a commit of incompressible data); the
price is a second pass over the disk. Unaligned pieces (compressed chunks, raw-block
frames, a file's tail) are written buffered; a filesystem that refuses O_DIRECT gets
buffered I/O and a read-back after dropping the synced pages. Either way a commit
returns only once every stored byte was synced and read back equal, and the page cache
holds none of it (the running job keeps its memory).

Reading (extract, verify): worker threads each take a chunk, read its stored bytes,
check their hash, and (extract) decode and write the raw bytes at their offset in the
destination (pwrite: no ordering needed); verify checks hashes and frame headers only.
Stored files are read with O_DIRECT where the filesystem takes it: no page cache to fill
and drop, and the check reads the storage. The first failure stops the rest.

Knows file descriptors and chunks; the image store opens every file (safely) for it.
"""

from __future__ import annotations

import collections
import fcntl
import mmap
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from slurm_mm.store import chunks as chunkmod
from slurm_mm.store.chunks import Buffer, Chunk, Encoder, Mismatch
from slurm_mm.store.priority import Priority

SYNC_BYTES = 128 << 20
READ_BACK_MODES = ("device", "cache")
_IOV_MAX = 512

before_read_back: Callable[[int], None] | None = None
"""Test-only patch point, called by the verifier with the file index before it reads a
batch back (a test damages the written file there). Never read from the environment."""


class Cancelled(Exception):
    """Another part of the same operation failed first; stop quietly."""


class SourceChanged(Exception):
    """A source file changed while it was being stored (the caller names it)."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index


class ReadBackMismatch(Exception):
    """A chunk read back after writing differs from what was written."""

    def __init__(self, index: int, chunk: int, message: str) -> None:
        super().__init__(message)
        self.index = index
        self.chunk = chunk


@dataclass
class WrittenFile:
    """What the writer stored for one source file."""

    zst: bool
    chunks: list[Chunk] = field(default_factory=list)

    @property
    def stored_size(self) -> int:
        return sum(c.stored_size for c in self.chunks)


@dataclass
class _Open:
    """A file being written: its write fd, and the verifier's own read fd."""

    index: int
    wfd: int
    rfd: int
    stored: int = 0
    direct: bool = False  # O_DIRECT is on for wfd now
    direct_ok: bool = True  # the filesystem takes O_DIRECT (until it refused once)
    direct_bytes: int = 0  # bytes written directly
    read_direct: bool | None = None  # the verifier's rfd reads directly (None: not tried)


def _write_chunk(opened: _Open, pieces: list[Buffer], chunk: Chunk, direct: bool) -> None:
    """Write one chunk's pieces at the end of the file; directly from the aligned buffer
    when allowed and everything lines up, else through the page cache."""
    use = (direct and opened.direct_ok and len(pieces) == 1 and not chunk.compressed
           and opened.stored % ALIGN == 0 and len(pieces[0]) % ALIGN == 0 and len(pieces[0]) > 0
           and isinstance(pieces[0], memoryview) and not pieces[0].readonly)
    if use != opened.direct:
        if set_direct(opened.wfd, use):
            opened.direct = use
        else:
            opened.direct_ok = False
            opened.direct = False
            use = False
    if use:
        view = pieces[0]
        done = 0
        while done < len(view):
            done += os.pwrite(opened.wfd, view[done:], opened.stored + done)
        os.lseek(opened.wfd, opened.stored + done, os.SEEK_SET)
        opened.direct_bytes += done
    else:
        _writev_all(opened.wfd, pieces)


# Direct I/O wants buffer address, file offset and length aligned to the device's logical
# block; 4096 covers every block size in use (512 and 4096).
ALIGN = 4096


def aligned_buffer(size: int) -> mmap.mmap:
    """A page-aligned buffer (anonymous mapping), usable for direct I/O."""
    return mmap.mmap(-1, max(size, 1))


def set_direct(fd: int, on: bool) -> bool:
    """Switch O_DIRECT on or off for fd; False if the filesystem refuses it."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    new = (flags | os.O_DIRECT) if on else (flags & ~os.O_DIRECT)
    if new != flags:
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, new)
        except OSError:
            return False
    return True


def _aligned_span(offset: int, length: int) -> tuple[int, int]:
    """The aligned range [start, end) that covers [offset, offset + length)."""
    start = offset - offset % ALIGN
    end = -(-(offset + length) // ALIGN) * ALIGN
    return start, end


def _pread_direct(fd: int, view: memoryview, offset: int, length: int) -> tuple[memoryview, int]:
    """Read [offset, offset + length) through an O_DIRECT fd into the aligned `view` (at
    least the aligned span long); returns the requested bytes' view and how many arrived."""
    start, end = _aligned_span(offset, length)
    done = 0
    while start + done < end:
        n = os.preadv(fd, [view[done:end - start]], start + done)
        if n <= 0:
            break
        done += n
        if n % ALIGN:  # end of file
            break
    skip = offset - start
    got = max(0, min(length, done - skip))
    return view[skip:skip + length], got


# Reads go in pieces of this size: measured on a VM's virtio disk, cold 8 MiB reads cost
# 3-4x the CPU time of 1 MiB ones for the same bytes.
READ_PIECE = 1 << 20


def _pread_full(fd: int, view: memoryview, offset: int) -> int:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:done + READ_PIECE]], offset + done)
        if n == 0:
            break
        done += n
    return done


def _writev_all(fd: int, pieces: list[Buffer]) -> None:
    views = [memoryview(p).cast("B") for p in pieces if len(p)]
    while views:
        n = os.writev(fd, views[:_IOV_MAX])
        while n and views:
            if n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][n:]
                n = 0


def _drop_cache(fd: int, offset: int, length: int) -> None:
    try:
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass  # only a hint


class _Errors:
    """The first failure of any thread; everyone else stops at their next step."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.first: BaseException | None = None
        self._lock = threading.Lock()

    def add(self, exc: BaseException) -> None:
        if isinstance(exc, Cancelled):
            return
        with self._lock:
            if self.first is None:
                self.first = exc
        self.event.set()

    def check(self) -> None:
        if self.event.is_set():
            raise Cancelled()

    def raise_first(self) -> None:
        if self.first is not None:
            raise self.first


def write_files(sizes: list[int], *, zst_modes: list[bool], open_source: Callable[[int], int],
                create_stored: Callable[[int, bool], int], open_stored: Callable[[int, bool], int],
                encoder: Encoder, chunk_size: int, workers: int, priority: Priority, read_back: str,
                on_bytes: Callable[[int], None] | None = None,
                on_file_written: Callable[[int], None] | None = None) -> list[WrittenFile]:
    """Store files 0..n-1 (`sizes` bytes each) as chunks, in order, and return what was
    stored. open_source(i) opens source file i; create_stored(i, zst) creates its stored
    file (named by zst) and open_stored(i, zst) opens it again for reading back. zst_modes[i]
    says whether a multi-chunk file is a .zst (single-chunk files decide per chunk).
    on_file_written(i) is called (from the writer thread) once file i is fully written.
    Raises the first error of any thread; every fd is closed either way."""
    if read_back not in READ_BACK_MODES:
        raise ValueError(f"read_back {read_back!r} is not one of {READ_BACK_MODES}")
    results = [WrittenFile(zst=zst_modes[i]) for i in range(len(sizes))]
    errors = _Errors()
    window = 2 * workers + 2
    direct = read_back == "device"
    buffers: queue.SimpleQueue[mmap.mmap] = queue.SimpleQueue()
    for _ in range(window):
        buffers.put(aligned_buffer(min(chunk_size, max(sizes, default=0)) or 1))
    to_verify: queue.SimpleQueue[tuple[str, _Open, list[tuple[int, int, Chunk]]] | None] = queue.SimpleQueue()

    def encode(src: int, offset: int, length: int, zst: bool, single: bool) -> tuple[list[Buffer], Chunk, mmap.mmap | None]:
        errors.check()
        state.lowered = priority.check(getattr(state, "lowered", False))
        buf = buffers.get()
        try:
            with priority.slot():
                started = time.thread_time()
                try:
                    view = memoryview(buf)[:length]
                    if _pread_full(src, view, offset) != length:
                        raise Mismatch("shrank while it was being stored")
                    pieces, chunk = encoder.encode(view, zst=zst, single=single)
                finally:
                    priority.spend(time.thread_time() - started)
        except BaseException:
            buffers.put(buf)
            raise
        if chunk.compressed and chunk.stored_size < length:
            buffers.put(buf)  # the compressed copy is all the writer needs
            return pieces, chunk, None
        return pieces, chunk, buf

    state = threading.local()

    def init_worker() -> None:
        priority.enter()
        state.lowered = priority.background

    def writer() -> None:
        init_worker()
        sources: dict[int, int] = {}
        pending: collections.deque[tuple[int, int, Future | None]] = collections.deque()
        tasks = ((i, c) for i, size in enumerate(sizes) for c in range(max(1, -(-size // chunk_size))))
        current: _Open | None = None
        batch: list[tuple[int, int, Chunk]] = []
        batch_bytes = 0
        try:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mm-store-encode",
                                    initializer=init_worker) as pool:
                def submit() -> bool:
                    task = next(tasks, None)
                    if task is None:
                        return False
                    i, c = task
                    if sizes[i] == 0:
                        pending.append((i, c, None))
                        return True
                    if c == 0:
                        sources[i] = open_source(i)
                    length = min(chunk_size, sizes[i] - c * chunk_size)
                    single = sizes[i] <= chunk_size
                    pending.append((i, c, pool.submit(encode, sources[i], c * chunk_size, length,
                                                      zst_modes[i] or single, single)))
                    return True

                try:
                    while len(pending) < window and submit():
                        pass
                    while pending:
                        errors.check()
                        i, c, future = pending.popleft()
                        if future is None:  # an empty file
                            current = _Open(i, create_stored(i, False), -1)
                            results[i].zst = False
                        else:
                            try:
                                pieces, chunk, buf = future.result()
                            except Mismatch as exc:
                                raise SourceChanged(i, str(exc)) from None
                            if c == 0:
                                if sizes[i] <= chunk_size:
                                    results[i].zst = chunk.compressed
                                wfd = create_stored(i, results[i].zst)
                                try:
                                    rfd = open_stored(i, results[i].zst)
                                except BaseException:
                                    os.close(wfd)
                                    raise
                                current = _Open(i, wfd, rfd)
                            assert current is not None and current.index == i
                            started = time.thread_time()
                            _write_chunk(current, pieces, chunk, direct)
                            priority.spend(time.thread_time() - started)
                            del pieces
                            if buf is not None:
                                buffers.put(buf)
                            results[i].chunks.append(chunk)
                            batch.append((c, current.stored, chunk))
                            current.stored += chunk.stored_size
                            batch_bytes += chunk.stored_size
                            if on_bytes:
                                on_bytes(min(chunk_size, sizes[i] - c * chunk_size))
                        last = c == max(1, -(-sizes[i] // chunk_size)) - 1
                        if last or batch_bytes >= SYNC_BYTES:
                            to_verify.put(("end" if last else "sync", current, batch))  # type: ignore[arg-type]
                            batch, batch_bytes = [], 0
                        if last:
                            current = None
                            src = sources.pop(i, None)
                            if src is not None:
                                os.close(src)
                            if on_file_written:
                                on_file_written(i)
                        state.lowered = priority.check(state.lowered)
                        submit()
                except BaseException as exc:
                    errors.add(exc)
                    for _, _, future in pending:
                        if future is not None:
                            future.cancel()
                    raise
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            errors.add(exc)
            if current is not None:
                to_verify.put(("abort", current, []))
        finally:
            for src in sources.values():
                os.close(src)
            to_verify.put(None)

    def verifier() -> None:
        init_worker()
        buf = aligned_buffer(0)
        while True:
            item = to_verify.get()
            if item is None:
                return
            kind, opened, batch = item
            state.lowered = priority.check(state.lowered)
            started = time.thread_time()
            try:
                if kind == "abort" or errors.event.is_set():
                    continue
                if opened.rfd < 0:  # empty file
                    os.fsync(opened.wfd)
                    continue
                if kind == "end":
                    os.fsync(opened.wfd)
                else:
                    os.fdatasync(opened.wfd)
                if not batch:
                    continue
                start = batch[0][1]
                length = batch[-1][1] + batch[-1][2].stored_size - start
                hook = before_read_back
                if hook is not None:
                    hook(opened.index)
                if read_back == "device" and opened.read_direct is None:
                    opened.read_direct = set_direct(opened.rfd, True)
                if read_back == "device" and not opened.read_direct:
                    _drop_cache(opened.rfd, start, length)
                for c, offset, chunk in batch:
                    if opened.read_direct:
                        need = chunk.stored_size + 2 * ALIGN
                        if len(buf) < need:
                            buf = aligned_buffer(need)
                        view, got = _pread_direct(opened.rfd, memoryview(buf), offset, chunk.stored_size)
                    else:
                        if len(buf) < chunk.stored_size:
                            buf = aligned_buffer(chunk.stored_size)
                        view = memoryview(buf)[:chunk.stored_size]
                        got = _pread_full(opened.rfd, view, offset)
                    found = chunkmod.digest(view[:got])
                    del view
                    if got != chunk.stored_size or found != chunk.hash:
                        raise ReadBackMismatch(opened.index, c, f"chunk {c} read back as {got} bytes with "
                                               f"{chunkmod.HASH_NAME} {found[:12]}..., written "
                                               f"{chunk.stored_size} with {chunk.hash[:12]}...")
                _drop_cache(opened.rfd, start, length)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                errors.add(exc)
            finally:
                priority.spend(time.thread_time() - started)
                if kind in ("end", "abort"):
                    os.close(opened.wfd)
                    if opened.rfd >= 0:
                        os.close(opened.rfd)

    threads = [threading.Thread(target=writer, name="mm-store-write"),
               threading.Thread(target=verifier, name="mm-store-verify")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors.raise_first()
    return results


@dataclass(frozen=True)
class ReadFile:
    """A stored file to read: its chunks, an fd of its stored bytes, where raw bytes go."""

    chunks: list[tuple[int, int, int, Chunk, int]]  # (index, raw offset, stored offset, chunk, raw length)
    stored_fd: int
    out_fd: int | None


class ChunkError(Exception):
    """A chunk failed its check while reading; names file and chunk for the caller."""

    def __init__(self, file_index: int, chunk: int, stored_offset: int, message: str) -> None:
        super().__init__(message)
        self.file_index = file_index
        self.chunk = chunk
        self.stored_offset = stored_offset


SPAN_BYTES = 16 << 20
READERS = 2
SEQUENTIAL_MIN_WORKERS = 4
SEQUENTIAL_READS: bool | None = None
"""True: read_files reads each file front to back in spans of consecutive chunks up to
SPAN_BYTES, by READERS threads, and leaves the checking to the workers (the pattern of
`cat`); False: every worker reads its own chunk. None (the default) chooses by the
workers: sequential from SEQUENTIAL_MIN_WORKERS on. Measured (docs/benchmarks.md, "Fourth
pass"): on a 16-core H200 machine's virtio disk, 8 GiB, sequential verify ran at 1.04-1.05x
of a cold `cat` and extract at 0.87-0.98x, per-chunk reads at 0.72-0.77x and 0.70-0.78x;
on a 2-vCPU VM (2 workers) sequential was no faster (verify 0.47-0.83x against 0.71-0.84x),
so two workers keep per-chunk reads."""


def _sequential(workers: int) -> bool:
    if SEQUENTIAL_READS is not None:
        return SEQUENTIAL_READS
    return workers >= SEQUENTIAL_MIN_WORKERS


def read_files(files: list[ReadFile], *, workers: int, on_bytes: Callable[[int], None] | None = None,
               drop_cache: bool = True) -> None:
    """Check (and write out, where out_fd is set) every chunk of `files`, in parallel.
    Raises ChunkError for the first bad chunk; the caller owns and closes the fds.
    Stored files are read with O_DIRECT where their filesystem takes it (the caller's
    fds are switched: they are used by nothing else meanwhile). See SEQUENTIAL_READS."""
    errors = _Errors()
    local = threading.local()
    direct = [set_direct(f.stored_fd, True) for f in files]

    def process(file_index: int, item: tuple[int, int, int, Chunk, int], view: memoryview, got: int) -> None:
        index, raw_off, stored_off, chunk, raw_len = item
        f = files[file_index]
        if got != chunk.stored_size:
            raise Mismatch(f"ends after {got} of its {chunk.stored_size} bytes")
        if f.out_fd is None:  # verify: the stored bytes' hash and frame size
            chunkmod.check(view, chunk, raw_len)
        else:
            out = memoryview(chunkmod.decode(view, chunk, raw_len))
            done = 0
            while done < len(out):
                done += os.pwrite(f.out_fd, out[done:], raw_off + done)
            del out
        if drop_cache and not direct[file_index]:
            _drop_cache(f.stored_fd, stored_off, chunk.stored_size)
        if on_bytes:
            on_bytes(raw_len)

    def guarded(file_index: int, item: tuple[int, int, int, Chunk, int], fn: Callable[[], None]) -> None:
        if errors.event.is_set():
            return
        try:
            fn()
        except Mismatch as exc:
            errors.add(ChunkError(file_index, item[0], item[2], str(exc)))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            errors.add(exc)

    def read(fd: int, is_direct: bool, buf: mmap.mmap, offset: int, length: int) -> tuple[memoryview, int]:
        try:
            if is_direct:
                return _pread_direct(fd, memoryview(buf), offset, length)
            view = memoryview(buf)[:length]
            return view, _pread_full(fd, view, offset)
        except OSError as exc:  # a read error of the image, not of the destination
            raise Mismatch(f"cannot be read ({exc.strerror})") from None

    def one(file_index: int, item: tuple[int, int, int, Chunk, int]) -> None:
        def run() -> None:
            chunk = item[3]
            need = chunk.stored_size + 2 * ALIGN
            buf = getattr(local, "buf", None)
            if buf is None or len(buf) < need:
                buf = local.buf = aligned_buffer(need)
            view, got = read(files[file_index].stored_fd, direct[file_index], buf, item[2], chunk.stored_size)
            try:
                process(file_index, item, view, got)
            finally:
                del view
        guarded(file_index, item, run)

    work = [(i, item) for i, f in enumerate(files) for item in f.chunks]
    if not _sequential(workers) or workers <= 1 or len(work) <= 1:
        if workers <= 1 or len(work) <= 1:
            for i, item in work:
                one(i, item)
        else:
            with ThreadPoolExecutor(max_workers=min(workers, len(work)), thread_name_prefix="mm-store-read") as pool:
                for future in [pool.submit(one, i, item) for i, item in work]:
                    future.result()
        errors.raise_first()
        return
    _read_sequential(files, work, direct, workers, errors, read, process, guarded)
    errors.raise_first()


def _spans(work: list[tuple[int, tuple[int, int, int, Chunk, int]]]) -> list[tuple[int, list]]:
    """Runs of consecutive chunks of one file (each starting where the last ended), up to
    SPAN_BYTES (a larger chunk alone), in file order."""
    spans: list[tuple[int, list]] = []
    for i, item in work:
        if spans and spans[-1][0] == i:
            last = spans[-1][1]
            first, prev = last[0], last[-1]
            if (prev[2] + prev[3].stored_size == item[2]
                    and item[2] + item[3].stored_size - first[2] <= SPAN_BYTES):
                last.append(item)
                continue
        spans.append((i, [item]))
    return spans


def _read_sequential(files, work, direct, workers, errors, read, process, guarded) -> None:
    spans = _spans(work)
    biggest = max(items[-1][2] + items[-1][3].stored_size - items[0][2] for _, items in spans)
    pool_size = workers + READERS
    buffers: queue.SimpleQueue[mmap.mmap] = queue.SimpleQueue()
    for _ in range(min(pool_size, len(spans) + READERS)):
        buffers.put(aligned_buffer(biggest + 2 * ALIGN))
    order = iter(spans)
    order_lock = threading.Lock()

    def reader(pool: ThreadPoolExecutor, futures: list[Future]) -> None:
        while not errors.event.is_set():
            with order_lock:  # take the next span and start reading it in file order
                span = next(order, None)
                if span is None:
                    return
                buf = buffers.get()
            i, items = span
            start = items[0][2]
            length = items[-1][2] + items[-1][3].stored_size - start
            try:
                view, got = read(files[i].stored_fd, direct[i], buf, start, length)
                futures.append(pool.submit(check_span, i, items, buf, view, got, start))
            except Mismatch as exc:
                buffers.put(buf)
                errors.add(ChunkError(i, items[0][0], items[0][2], str(exc)))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                buffers.put(buf)
                errors.add(exc)

    def process_piece(i: int, item: tuple, view: memoryview, rel: int, have: int) -> None:
        piece = view[rel:rel + have]
        try:
            process(i, item, piece, have)
        finally:
            piece.release()

    def check_span(i: int, items: list, buf: mmap.mmap, view: memoryview, got: int, start: int) -> None:
        try:
            for item in items:
                rel = item[2] - start
                size = item[3].stored_size
                have = max(0, min(size, got - rel))
                guarded(i, item, lambda: process_piece(i, item, view, rel, have))
        finally:
            view.release()
            buffers.put(buf)

    futures: list[Future] = []
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mm-store-check") as pool:
        readers = [threading.Thread(target=reader, args=(pool, futures), name="mm-store-read")
                   for _ in range(min(READERS, len(spans)))]
        for t in readers:
            t.start()
        for t in readers:
            t.join()
    for future in futures:
        future.result()
