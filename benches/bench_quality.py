"""Run `gmtier bench-quality` (same flags): python benches/bench_quality.py --config configs/small.toml --set experts.mode=resident"""

from gmtier.bench.quality import bench_quality

if __name__ == "__main__":
    bench_quality()
