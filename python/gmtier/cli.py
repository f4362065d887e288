"""The `gmtier` command line. The commands live in two places: `gmtier.commands` (prepare, train,
eval, generate, info, plot) and `gmtier.bench` (bench-paging, bench-adam, bench-train, bench-quality); this file only
gathers them. Each is a `gmtier.user_errors.Command`: a user error ends in one line, not a traceback."""

import click

from gmtier.bench.adam import bench_adam
from gmtier.bench.paging import bench_paging
from gmtier.bench.quality import bench_quality
from gmtier.bench.train import bench_train
from gmtier.commands import COMMANDS


@click.group()
@click.version_option(package_name="gmtier")
def main() -> None:
    """Train Switch Transformer LMs whose experts live on NVMe, paged through pinned RAM to the GPU."""


for _command in (*COMMANDS, bench_paging, bench_adam, bench_train, bench_quality):
    main.add_command(_command)


if __name__ == "__main__":
    main()
