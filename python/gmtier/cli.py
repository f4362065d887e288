"""The `gmtier` command line. Each command lives with the code it drives; this file only gathers them."""

import click

from gmtier.bench.adam import bench_adam
from gmtier.bench.paging import bench_paging
from gmtier.bench.train import bench_train
from gmtier.commands import COMMANDS
from gmtier.data import prepare_command


@click.group()
@click.version_option(package_name="gmtier")
def main() -> None:
    """Train Switch Transformer LMs whose experts live on NVMe, paged through pinned RAM to the GPU."""


for _command in (prepare_command, *COMMANDS, bench_paging, bench_adam, bench_train):
    main.add_command(_command)


if __name__ == "__main__":
    main()
