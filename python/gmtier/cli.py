"""The `gmtier` command line. Each command lives with the code it drives; this file only gathers them."""

import click


@click.group()
@click.version_option(package_name="gmtier")
def main() -> None:
    """Train Switch Transformer LMs whose experts live on NVMe, paged through pinned RAM to the GPU."""


def _register() -> None:
    # Imported here, not at the top, so `gmtier --help` stays fast and one broken command
    # does not hide the others.
    from gmtier.bench.adam import bench_adam
    from gmtier.bench.paging import bench_paging
    from gmtier.data import prepare_command

    main.add_command(prepare_command)
    main.add_command(bench_paging)
    main.add_command(bench_adam)
    try:
        from gmtier.commands import COMMANDS
    except ImportError:  # the training commands are added by the model/loop work
        COMMANDS = []
    for command in COMMANDS:
        main.add_command(command)


_register()
