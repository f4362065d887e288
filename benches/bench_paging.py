"""Run `gmtier bench-paging` (same flags): python benches/bench_paging.py --dir /path/on/nvme --json"""

from gmtier.bench.paging import bench_paging

if __name__ == "__main__":
    bench_paging()
