"""Run `gmtier bench-adam` (same flags): python benches/bench_adam.py --threads 16 --params 256000000 --json"""

from gmtier.bench.adam import bench_adam

if __name__ == "__main__":
    bench_adam()
