"""The `gmtier bench-*` commands; `counts` parses their comma-separated sweeps."""

import click


def counts(text: str, param_hint: str, example: str) -> list[int]:
    """"1,16,64" -> [1, 16, 64] (blank entries skipped), or a BadParameter naming the option."""
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected counts such as {example}", param_hint=param_hint) from None
