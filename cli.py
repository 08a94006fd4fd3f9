"""`cbd-cache`: the command line. Every command takes --pipeline, --workdir and any number of --set key=value."""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from cbd_cache import __version__
from cbd_cache.config import DEFAULT_PIPELINE, Config, ConfigError, load_config


class Context:
    def __init__(self, cfg: Config, workdir: Path):
        self.cfg = cfg
        from cbd_cache.workdir import Workdir

        self.wd = Workdir(workdir)
        self._runtime = None

    @property
    def runtime(self):
        if self._runtime is None:
            from cbd_cache.runtime import make_runtime

            self._runtime = make_runtime(self.cfg.pipeline)
        return self._runtime


def pipeline_options(fn=None, *, workdir_default: str = "runs/{name}"):
    """--pipeline / --workdir / --set, loaded and validated into a Context before anything is written."""
    if fn is None:
        return functools.partial(pipeline_options, workdir_default=workdir_default)

    @click.option("--pipeline", "pipeline", default=DEFAULT_PIPELINE, show_default=True,
                  help="Pipeline recipe (TOML).")
    @click.option("--workdir", default=None,
                  help=f"Where data, checkpoints and the cache live [{workdir_default.replace('{name}', '<pipeline name>')}].")
    @click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                  help="Override a config value, e.g. --set student.alpha=0.2 (repeatable).")
    @functools.wraps(fn)
    def wrapper(pipeline: str, workdir: str | None, overrides: tuple[str, ...], **kwargs):
        cfg = load_config(pipeline, overrides)
        return fn(Context(cfg, Path(workdir or workdir_default.format(name=cfg.pipeline.name))), **kwargs)
    return wrapper


class CLI(click.Group):
    """Turns expected failures into one line on stderr: exit 2 for bad input, 1 for a failed stage."""

    def invoke(self, ctx):
        from cbd_cache.cache import CacheError

        try:
            return super().invoke(ctx)
        except (ConfigError, CacheError, FileNotFoundError) as e:
            click.echo(f"cbd-cache: error: {e}", err=True)
            sys.exit(2)


@click.group(cls=CLI, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cbd-cache")
def main():
    """Class-Balanced Distillation with a cache of teacher descriptors.

    Stages: prepare -> train-teacher -> export -> train-student -> evaluate (or `run` for all).
    """


@main.command()
@click.option("--dry-run", is_flag=True,
              help="List the source and print class counts, shards, cache size and an export-time estimate; write nothing.")
@pipeline_options
def prepare(ctx: Context, dry_run: bool):
    """Write WebDataset shards (train, val, test) and a manifest from `data.format` at `data.root` (resumable)."""
    if dry_run:
        from cbd_cache.data.dryrun import dry_run as plan

        click.echo(plan(ctx.cfg, ctx.runtime))
        return
    from cbd_cache.data.prepare import prepare as run_prepare

    run_prepare(ctx.cfg, ctx.wd)


@main.command("train-teacher")
@click.option("--name", "names", multiple=True, help="Teacher(s) to train (repeatable) [all in the pipeline].")
@pipeline_options
def train_teacher(ctx: Context, names: tuple[str, ...]):
    """Stage 1: train teachers with instance sampling; skips teachers already trained with the same config."""
    from cbd_cache.teachers import train_teacher as run

    for t in [ctx.cfg.teacher_by_name(n) for n in names] if names else ctx.cfg.teachers:
        run(ctx.cfg, t, ctx.wd, ctx.runtime)


@main.command()
@pipeline_options
def export(ctx: Context):
    """Run every teacher over A views of every training image into the Zarr cache (resumable)."""
    from cbd_cache.export import export_cache

    export_cache(ctx.cfg, ctx.wd, ctx.runtime)


@main.command("train-student")
@pipeline_options
def train_student(ctx: Context):
    """Stage 2: train the student from the cache (no teacher runs), class-balanced."""
    from cbd_cache.student import train_student as run

    run(ctx.cfg, ctx.wd, ctx.runtime)


@main.command()
@pipeline_options
def evaluate(ctx: Context):
    """Evaluate every teacher and student in the workdir; write results.md and results.json."""
    from cbd_cache.evaluation import evaluate_workdir

    evaluate_workdir(ctx.cfg, ctx.wd, ctx.runtime)
    click.echo(ctx.wd.results_md.read_text())


@main.command()
@pipeline_options
def run(ctx: Context):
    """Every stage in order, skipping what is already done; prints the results table."""
    from cbd_cache.data.prepare import prepare as run_prepare
    from cbd_cache.evaluation import evaluate_workdir
    from cbd_cache.export import export_cache
    from cbd_cache.student import train_student as run_student
    from cbd_cache.teachers import train_teacher as run_teacher

    run_prepare(ctx.cfg, ctx.wd)
    for t in ctx.cfg.teachers:
        run_teacher(ctx.cfg, t, ctx.wd, ctx.runtime)
    export_cache(ctx.cfg, ctx.wd, ctx.runtime)
    run_student(ctx.cfg, ctx.wd, ctx.runtime)
    evaluate_workdir(ctx.cfg, ctx.wd, ctx.runtime)
    click.echo(ctx.wd.results_md.read_text())


@main.command()
@click.option("--grid", "grids", multiple=True, metavar="KEY=V1,V2,...",
              help="A student setting and its values, e.g. student.alpha=0,0.2,0.4 (repeatable: the grid is the product).")
@click.option("--seeds", default="0,1,2", show_default=True, help="Seeds of every grid point (student.seed).")
@click.option("--name", default="", help="Table name under W/sweeps/ [sweep_<keys>].")
@pipeline_options
def sweep(ctx: Context, grids: tuple[str, ...], seeds: str, name: str):
    """Train a grid of student settings x seeds from one cache (finished runs are skipped); mean ± std table."""
    from cbd_cache.sweep import parse_grid, parse_seeds, run_sweep

    grid, seed_list = parse_grid(grids), parse_seeds(seeds)
    _, md = run_sweep(ctx.cfg, ctx.wd, ctx.runtime, grid, seed_list, name)
    click.echo(md.read_text())


@main.command()
@click.argument("models", nargs=-1, required=True)
@click.option("--features", type=click.Choice(["images", "cache"]), default="images", show_default=True,
              help="Class means from the model run over the training images, or from its cached descriptors.")
@pipeline_options
def ncm(ctx: Context, models: tuple[str, ...], features: str):
    """Nearest-class-mean accuracy of MODELS (teachers/<name>, students/<run>) on centred, normalised features."""
    from cbd_cache.evaluation import markdown_table
    from cbd_cache.ncm import ncm_report

    rows = [{"model": m, "kind": f"NCM ({features} features)", **ncm_report(ctx.cfg, ctx.wd, ctx.runtime, m, features)}
            for m in models]
    click.echo(markdown_table(rows))


@main.command("paper-table")
@click.option("--out", default="results", show_default=True, help="Folder for <pipeline name>.md/.json and the PNGs.")
@click.option("--time-limit-min", type=float, default=0, show_default=True,
              help="Start no new run after this many minutes (0: no limit); run again to continue.")
@pipeline_options(workdir_default="runs/{name}_paper")
def paper_table(ctx: Context, out: str, time_limit_min: float):
    """The paper's Tables 1-3, Figure 3, views per image and per-class plots, 3 seeds, from one cache."""
    from cbd_cache.report import paper_table as run

    if not run(ctx.cfg, ctx.wd, ctx.runtime, Path(out), time_limit_min):
        click.echo("paper-table: stopped at the time limit; the same command continues where it stopped", err=True)
        sys.exit(3)
    click.echo((Path(out) / f"{ctx.cfg.pipeline.name}.md").read_text())


@main.group()
def cache():
    """Inspect the teacher-descriptor cache."""


@cache.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@pipeline_options
def info(ctx: Context, as_json: bool):
    """Arrays, shapes, dtypes, chunking, fingerprint, completeness and bytes on disk."""
    from cbd_cache.cache import cache_info

    d = cache_info(ctx.wd.cache)
    if as_json:
        click.echo(json.dumps(d, indent=1))
        return
    click.echo(f"{d['path']}: schema {d['schema_version']}, {'complete' if d['complete'] else 'INCOMPLETE'} "
               f"({d['shards_done']}/{d['shards_total']} shards), {d['bytes_on_disk'] / 2**20:.1f} MiB on disk")
    click.echo(f"manifest fingerprint {d['manifest_fingerprint']}, {d['views_per_image']} views per image, "
               f"view seed {d['view_seed']}")
    for name, a in d["arrays"].items():
        click.echo(f"  {name:<28} {str(a['shape']):<20} {a['dtype']:<8} chunks {a['chunks']}  "
                   f"{a['bytes_stored'] / 2**20:.2f} MiB")
    for name, t in d["teachers"].items():
        click.echo(f"  teacher {name}: {t['type']} {t['arch']} seed {t['seed']} sha256 {t['checkpoint_sha256'][:12]}")


if __name__ == "__main__":
    main()
