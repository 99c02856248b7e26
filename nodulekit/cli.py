"""The `nodulekit` command. Thin: parse options, call the library, print."""

from __future__ import annotations

import json

import click

from nodulekit import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="nodulekit")
def main():
    """Lung-nodule segmentation in CT on a hand-written engine."""


# ----------------------------------------------------------------------------- bench


@main.group()
def bench():
    """Time our kernels and training step against the PyTorch reference."""


def _device_option(f):
    return click.option("--device", default="cpu", show_default=True,
                        type=click.Choice(["auto", "cpu", "cuda"]),
                        help="Backend to time ('auto' picks cuda when a GPU is usable).")(f)


@bench.command("ops")
@_device_option
@click.option("--op", "op_filter", default=None, help="Only ops whose name contains this.")
@click.option("--repeats", default=20, show_default=True, help="Timed runs per op (median).")
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False),
              help="Also write the results as JSON here ('-' for stdout).")
@click.option("--threads", default=None, type=int,
              help="CPU threads for both sides (default: all cores).")
def bench_ops(device, op_filter, repeats, json_path, threads):
    """Per-op timing: op, shape, our ms, torch ms, ratio (ours / torch)."""
    from nodulekit.bench.ops import format_table, run_ops_bench

    result = run_ops_bench(device=device, op_filter=op_filter, repeats=repeats, threads=threads)
    click.echo(format_table(result))
    _write_json(result, json_path)


@bench.command("step")
@_device_option
@click.option("--width", default=16, show_default=True)
@click.option("--depth", default=4, show_default=True)
@click.option("--size", default=128, show_default=True, help="Input H = W.")
@click.option("--batch", default=4, show_default=True)
@click.option("--repeats", default=10, show_default=True, help="Timed steps (median).")
@click.option("--warmup", default=3, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--threads", default=None, type=int,
              help="CPU threads for both sides (default: all cores).")
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False),
              help="Also write the results as JSON here ('-' for stdout).")
def bench_step(device, width, depth, size, batch, repeats, warmup, seed, threads, json_path):
    """One training step (forward, Dice loss, backward, Adam) against PyTorch."""
    from nodulekit.bench.step import format_step, run_step_bench

    result = run_step_bench(device=device, width=width, depth=depth, size=size, batch=batch,
                            repeats=repeats, warmup=warmup, seed=seed, threads=threads)
    click.echo(format_step(result))
    _write_json(result, json_path)


def _write_json(result, json_path):
    if not json_path:
        return
    text = json.dumps(result, indent=2)
    if json_path == "-":
        click.echo(text)
    else:
        with open(json_path, "w") as f:
            f.write(text + "\n")
        click.echo(f"wrote {json_path}")


# ----------------------------------------------------------------------------- data
# (synth, preprocess, bench loader: nodulekit/data, added below this line)


if __name__ == "__main__":
    main()
