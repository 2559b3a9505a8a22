"""Server memory over many sweeps: RSS after a warm-up, then after N more sweeps.

    patchserve serve --port 8766 &          # the bundled demo model
    python benchmarks/rss_growth.py --url http://127.0.0.1:8766 --pid $(pgrep -f "port 8766")

Half the sweeps are streamed, each sweeps two hooks with an auto-captured (and dropped) clean
run; a leak of any per-request object shows as growth.
"""

from __future__ import annotations

import argparse
import time

import httpx

BODY = {
    "prompt": "The capital of Sunror is",
    "clean_prompt": "The capital of Rorsun is",
    "answer_token": " Pesmum",
    "foil_token": " Terzir",
    "metric": "recovered",
    "hooks": ["post_block", "mlp_out"],
}


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8766")
    parser.add_argument("--pid", type=int, required=True, help="the server's process id")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--sweeps", type=int, default=500)
    args = parser.parse_args()
    with httpx.Client(base_url=args.url, timeout=60) as client:
        for _ in range(args.warmup):
            client.post("/v1/patch_sweep", json=BODY).raise_for_status()
        before, started = rss_mib(args.pid), time.time()
        for i in range(args.sweeps):
            client.post("/v1/patch_sweep", json={**BODY, "stream": i % 2 == 1}).raise_for_status()
        after = rss_mib(args.pid)
    print(
        f"RSS after {args.warmup} warm-up sweeps {before:.1f} MiB, after {args.sweeps} more "
        f"{after:.1f} MiB (+{after - before:.1f} MiB) in {time.time() - started:.1f} s"
    )


if __name__ == "__main__":
    main()
