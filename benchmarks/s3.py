"""One-shot averaging over S3 against the S3 server's own ranged-read throughput, measured in the same run.

    python benchmarks/s3.py                      # 3 checkpoints of 32 MB, moto's S3 server on 127.0.0.1
    python benchmarks/s3.py --size 128MB --k 4 --repeat 3 --markdown s3.md

The server is moto's server mode (``moto[server]``, in the test extra), started as a child process on a free
port of 127.0.0.1 so that it does not share this process's interpreter lock. The inputs are the synthetic
Llama-layout checkpoints of ``benchmarks/gen.py``, uploaded with s3fs. Rows, alternated ``--repeat`` times
(the table shows the best of each):

* **ranged reads (baseline)**: the byte ranges the one-shot reads (every tensor, cut at the engine's piece
  size), fetched with ``fs.cat_file(path, start, end)`` on ``--threads`` threads (default: the engine's
  ``remote_reads``) — what the server delivers to a plain parallel client;
* **ckptavg average (one-shot)**: ``ckptavg average s3://... --method uniform`` as a library call: headers by
  ranged reads, then every tensor range, folded and written to a local folder. Its GB/s counts the
  checkpoints' tensor bytes over the whole call (indexing and writing included).

The ratio is one-shot / baseline (target: at least 0.7).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from gen import generate


def parse_size(text: str) -> int:
    from ckptavg.units import parse_size as parse

    return parse(text, option="--size")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("moto's S3 server did not start (pip install 'moto[server]')")


def baseline(fs, ranges: list[tuple[str, int, int]], threads: int) -> float:
    """Seconds to fetch every range with plain parallel ``fs.cat_file``."""
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        got = list(pool.map(lambda r: len(fs.cat_file(r[0], start=r[1], end=r[2])), ranges))
    seconds = time.perf_counter() - start
    assert sum(got) == sum(e - s for _, s, e in ranges)
    return seconds


def oneshot(urls: list[str], out: Path, storage: dict, threads: int) -> float:
    from ckptavg.averaging.engine import Engine
    from ckptavg.oneshot import AverageSpec, average_checkpoints, build_averages
    from ckptavg.reading.checkpoint import open_remote_many

    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    ckpts = open_remote_many(urls, storage_options=storage)  # as `ckptavg average URL...` indexes them
    with Engine(device="cpu", remote_reads=threads) as engine:
        averages = build_averages([AverageSpec("uniform")], device="cpu")
        average_checkpoints(ckpts, averages, out, engine=engine)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="32MB", help="bytes per checkpoint (default 32MB)")
    ap.add_argument("--k", type=int, default=3, help="checkpoints (default 3)")
    ap.add_argument("--repeat", type=int, default=2, help="alternated rounds; the best of each row is shown")
    ap.add_argument("--threads", type=int, default=None, help="reads in flight (default: the engine's remote_reads)")
    ap.add_argument("--markdown", type=Path, help="also write the table here")
    args = ap.parse_args()

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "benchmark-secret-access-key")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    import s3fs
    import torch

    from ckptavg.averaging.engine import DEFAULT_PIECE_ELEMS, DEFAULT_REMOTE_READS
    from ckptavg.reading.checkpoint import open_checkpoint

    threads = args.threads or DEFAULT_REMOTE_READS
    port = free_port()
    server = start_server(port)
    work = Path(tempfile.mkdtemp(prefix="ckptavg-s3-bench-"))
    try:
        endpoint = f"http://127.0.0.1:{port}"
        storage = {"endpoint_url": endpoint}
        fs = s3fs.S3FileSystem(**storage)
        fs.mkdir("bench")
        folders = generate(work / "run", parse_size(args.size), args.k)
        for f in folders:
            fs.put(str(f) + "/", f"bench/run/{f.name}/", recursive=True)
        urls = [f"s3://bench/run/{f.name}" for f in folders]
        ranges = []
        for u in urls:  # the one-shot's reads: every tensor, at the engine's piece size
            for ref in open_checkpoint(u, storage_options=storage).tensors.values():
                piece = DEFAULT_PIECE_ELEMS * ref.dtype.itemsize
                path = ref.file.url.removeprefix("s3://")
                ranges += [(path, ref.offset + lo, ref.offset + min(lo + piece, ref.nbytes))
                           for lo in range(0, ref.nbytes, piece)]
        nbytes = sum(e - s for _, s, e in ranges)
        torch.set_num_threads(1)
        base, ours = [], []
        for _ in range(args.repeat):
            base.append(baseline(fs, ranges, threads))
            ours.append(oneshot(urls, work / "out", storage, threads))
        b, o = min(base), min(ours)
        rows = [
            "| what | seconds | GB/s |",
            "|---|---:|---:|",
            f"| ranged reads, {threads} threads of fs.cat_file (baseline) | {b:.2f} | {nbytes / b / 1e9:.3f} |",
            f"| ckptavg average s3://... (one-shot, uniform) | {o:.2f} | {nbytes / o / 1e9:.3f} |",
            f"| **ratio** (one-shot / baseline; target >= 0.7) | | **{b / o:.2f}x** |",
        ]
        head = (f"{args.k} checkpoints of {nbytes / args.k / 1e6:.0f} MB of tensors ({len(ranges)} ranges) on moto's "
                f"S3 server at 127.0.0.1, best of {args.repeat}; {os.cpu_count()} CPUs")
        text = head + "\n\n" + "\n".join(rows) + "\n"
        print(text)
        if args.markdown:
            args.markdown.write_text(text)
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
