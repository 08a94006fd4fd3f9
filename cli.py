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


def pipeline_options(fn):
    """--pipeline / --workdir / --set, loaded and validated into a Context before anything is written."""
    @click.option("--pipeline", "pipeline", default=DEFAULT_PIPELINE, show_default=True,
                  help="Pipeline recipe (TOML).")
    @click.option("--workdir", default=None, help="Where data, checkpoints and the cache live [runs/<pipeline name>].")
    @click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                  help="Override a config value, e.g. --set student.alpha=0.2 (repeatable).")
    @functools.wraps(fn)
    def wrapper(pipeline: str, workdir: str | None, overrides: tuple[str, ...], **kwargs):
        cfg = load_config(pipeline, overrides)
        return fn(Context(cfg, Path(workdir or f"runs/{cfg.pipeline.name}")), **kwargs)
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
