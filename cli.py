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

        self.wd = Workdir(workdir, cfg.pipeline.data_url, cfg.pipeline.cache_url)
        self._runtime = None
        self.resume = False

    @property
    def runtime(self):
        """The device, and under torchrun this process's rank (joining the process group on first use)."""
        if self._runtime is None:
            import dataclasses

            from cbd_cache.runtime import make_runtime

            self._runtime = dataclasses.replace(make_runtime(self.cfg.pipeline), resume=self.resume)
        return self._runtime

    @property
    def main(self) -> bool:
        """Rank 0 (or no torchrun): the process that prepares, evaluates and writes shared files."""
        return self.runtime.dist.main


def resume_option(fn):
    @click.option("--resume", is_flag=True,
                  help="Continue a killed training run from its last checkpoint (resume.pt), to the same final step.")
    @functools.wraps(fn)
    def wrapper(ctx: Context, resume: bool, **kwargs):
        ctx.resume = resume
        return fn(ctx, **kwargs)
    return wrapper


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
        from cbd_cache import distributed
        from cbd_cache.cache import CacheError
        from cbd_cache.engine import NonFiniteLoss

        try:
            result = super().invoke(ctx)
            distributed.barrier()    # under torchrun no rank leaves before the others are done
            return result
        except (ConfigError, CacheError, FileNotFoundError) as e:
            click.echo(f"cbd-cache: error: {e}", err=True)
            sys.exit(2)
        except (NonFiniteLoss, distributed.JobsFailed) as e:
            click.echo(f"cbd-cache: error: {e}", err=True)
            sys.exit(1)
        finally:
            distributed.shutdown()


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
    prepare_data(ctx)


def prepare_data(ctx: Context) -> None:
    """Rank 0 prepares; with a remote `pipeline.data_url` it prepares W/data, then uploads it there."""
    import dataclasses

    from cbd_cache.data.prepare import prepare as run_prepare
    from cbd_cache.distributed import barrier, from_env
    from cbd_cache.runtime import log
    from cbd_cache.workdir import is_url, upload

    if from_env().main:   # (prepare needs no process group, so it joins none when run alone)
        if is_url(ctx.wd.data):
            local = dataclasses.replace(ctx.wd, data_url="")
            run_prepare(ctx.cfg, local)
            log(f"[prepare] uploading {local.data} to {ctx.wd.data}")
            upload(local.data, ctx.wd.data)
        else:
            run_prepare(ctx.cfg, ctx.wd)
    if from_env().world > 1:
        ctx.runtime   # join the group to wait for rank 0
        barrier()


@main.command("train-teacher")
@click.option("--name", "names", multiple=True, help="Teacher(s) to train (repeatable) [all in the pipeline].")
@click.option("--jobs", default=1, show_default=True, type=click.IntRange(min=1),
              help="Train this many teachers at once, one process each (on GPUs: one GPU each, round robin).")
@pipeline_options
@resume_option
def train_teacher(ctx: Context, names: tuple[str, ...], jobs: int):
    """Stage 1: train teachers with instance sampling; skips teachers already trained with the same config."""
    from cbd_cache.teachers import train_teacher as run

    teachers = [ctx.cfg.teacher_by_name(n) for n in names] if names else ctx.cfg.teachers
    if jobs > 1 and len(teachers) > 1:
        return train_teachers_in_parallel(ctx, [t.name for t in teachers], jobs)
    for t in teachers:
        run(ctx.cfg, t, ctx.wd, ctx.runtime)


def train_teachers_in_parallel(ctx: Context, names: list[str], jobs: int) -> None:
    """One `cbd-cache train-teacher --name N` process per teacher, `jobs` at a time."""
    import torch

    from cbd_cache.distributed import from_env, run_parallel

    if from_env().world > 1:
        raise ConfigError("--jobs trains one teacher per process; under torchrun train them one after another")
    common = ["train-teacher", "--pipeline", ctx.cfg.source, "--workdir", str(ctx.wd.root),
              *[x for o in ctx.cfg.overrides for x in ("--set", o)], *(["--resume"] if ctx.resume else [])]
    gpus = torch.cuda.device_count() if ctx.cfg.pipeline.device != "cpu" else 0
    run_parallel([[sys.executable, "-m", "cli", *common, "--name", n] for n in names], jobs, gpus)


@main.command()
@pipeline_options
def export(ctx: Context):
    """Run every teacher over A views of every training image into the Zarr cache (resumable)."""
    from cbd_cache.export import export_cache

    export_cache(ctx.cfg, ctx.wd, ctx.runtime)


@main.command("train-student")
@pipeline_options
@resume_option
def train_student(ctx: Context):
    """Stage 2: train the student from the cache (no teacher runs), class-balanced."""
    from cbd_cache.student import train_student as run

    run(ctx.cfg, ctx.wd, ctx.runtime)


@main.command()
@pipeline_options
def evaluate(ctx: Context):
    """Evaluate every teacher and student in the workdir; write results.md and results.json."""
    evaluate_all(ctx)


def evaluate_all(ctx: Context) -> None:
    """Rank 0 evaluates (the others wait at the command's closing barrier)."""
    from cbd_cache.evaluation import evaluate_workdir

    if ctx.main:
        evaluate_workdir(ctx.cfg, ctx.wd, ctx.runtime)
        click.echo(ctx.wd.results_md.read_text())


@main.command()
@pipeline_options
@resume_option
def run(ctx: Context):
    """Every stage in order, skipping what is already done; prints the results table."""
    from cbd_cache.distributed import barrier
    from cbd_cache.export import export_cache
    from cbd_cache.student import train_student as run_student
    from cbd_cache.teachers import train_teacher as run_teacher

    prepare_data(ctx)
    for t in ctx.cfg.teachers:
        run_teacher(ctx.cfg, t, ctx.wd, ctx.runtime)
        barrier()   # rank 0 has written the teacher before anyone reads it
    export_cache(ctx.cfg, ctx.wd, ctx.runtime)
    run_student(ctx.cfg, ctx.wd, ctx.runtime)
    barrier()
    evaluate_all(ctx)


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
@click.option("--sections", default="", metavar="S1,S2",
              help="Train only these sections (table2, views, alpha, mix) [all]; the report shows what is finished.")
@pipeline_options(workdir_default="runs/{name}_paper")
def paper_table(ctx: Context, out: str, time_limit_min: float, sections: str):
    """The paper's Tables 1-3, Figure 3, the view budget study and per-class plots, 3 seeds."""
    from cbd_cache.report import SECTION_KEYS, paper_table as run

    only = [k.strip() for k in sections.split(",") if k.strip()]
    if unknown := [k for k in only if k not in SECTION_KEYS]:
        raise ConfigError(f"--sections {sections}: no section {unknown[0]!r}; choose from {', '.join(SECTION_KEYS)}")
    if not run(ctx.cfg, ctx.wd, ctx.runtime, Path(out), time_limit_min, only):
        click.echo("paper-table: stopped at the time limit; the same command continues where it stopped", err=True)
        sys.exit(3)
    click.echo((Path(out) / f"{ctx.cfg.pipeline.name}.md").read_text())


@main.group()
def cache():
    """Inspect the teacher-descriptor cache."""


@cache.command()
@click.option("--rows", default=64, show_default=True, help="Random rows to recompute with the stored teachers.")
@click.option("--seed", default=0, show_default=True, help="Seed of the row sample.")
@click.option("--tolerance", default=5e-3, show_default=True, help="Largest cosine error (1 - cos) accepted.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@pipeline_options
def verify(ctx: Context, rows: int, seed: int, tolerance: float, as_json: bool):
    """Completeness, fingerprints, unit-norm rows, and a random sample of rows recomputed by the teachers.

    Exits 1 on any mismatch.
    """
    from cbd_cache.cache import verify_cache
    from cbd_cache.data.manifest import Manifest

    manifest = Manifest.load(ctx.wd.manifest)
    checkpoints = {t.name: ctx.wd.teacher_checkpoint(t.name) for t in ctx.cfg.teachers}
    report = verify_cache(ctx.wd.cache, manifest, checkpoints, ctx.runtime, rows, seed, tolerance)
    if as_json:
        click.echo(json.dumps(report, indent=1))
    else:
        errors = ", ".join(f"{k} {v:.2e}" for k, v in report["max_cosine_error"].items()) or "no teacher present"
        click.echo(f"{report['path']}: {report['rows_checked']} rows recomputed; max cosine error: {errors}")
        for problem in report["problems"]:
            click.echo(f"  MISMATCH {problem}")
        click.echo("OK" if not report["problems"] else f"FAILED: {len(report['problems'])} problem(s)")
    if report["problems"]:
        sys.exit(1)


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
    lo, hi = d["views_min_max"]
    click.echo(f"manifest fingerprint {d['manifest_fingerprint']}, view seed {d['view_seed']}; {d['allocation']} "
               f"allocation of A = {d['views_per_image']}: {lo}..{hi} views per image, {d['views_stored']} stored "
               f"({d['views_total']} with chunk padding, chunks of {d['chunk_views']} views)")
    for name, a in d["arrays"].items():
        click.echo(f"  {name:<28} {str(a['shape']):<20} {a['dtype']:<8} chunks {a['chunks']}  "
                   f"{a['bytes_stored'] / 2**20:.2f} MiB")
    for name, t in d["teachers"].items():
        click.echo(f"  teacher {name}: {t['type']} {t['arch']} seed {t['seed']} sha256 {t['checkpoint_sha256'][:12]}")


if __name__ == "__main__":
    main()
