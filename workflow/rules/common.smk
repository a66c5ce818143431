import json
import shlex
import sys
from pathlib import Path

import pandas as pd
from snakemake.utils import validate

validate(config, schema="../schemas/config.schema.yaml")


onstart:
    # on Slurm: every job's runtime against its partition's MaxTime, before submitting
    from scprint.slurm import check_before_submitting

    check_before_submitting(workflow)


# Every job, local or on a cluster node, finds the laminDB instance through settings kept
# in the project directory, runs the scprint package of this repository (also inside the
# per-rule conda environments, which hold only the dependencies) and logs W&B offline
# unless the user's WANDB_MODE says otherwise.
SCPRINT_ROOT = Path(workflow.basedir).parent
sys.path.insert(0, str(SCPRINT_ROOT))  # scprint.plan: the resource formulas below
shell.prefix(
    f"export LAMIN_SETTINGS_DIR={shlex.quote(str(Path(config['lamin']['settings_dir']).resolve()))}; "
    f"export PYTHONPATH={shlex.quote(str(SCPRINT_ROOT))}${{{{PYTHONPATH:+:$PYTHONPATH}}}}; "
    "export WANDB_MODE=${{WANDB_MODE:-offline}}; "
)

LAMIN_INSTANCE = "results/lamin_instance.json"
ONTOLOGIES = "results/ontologies.json"
DATASETS = "results/datasets.tsv"
# one row of the listing per dataset, rewritten only when that row changes: the download
# depends on its own row, so a growing listing redoes nothing already done
DATASET_ROWS = "results/listing"
DATASET_ROW = f"{DATASET_ROWS}/{{dataset}}.tsv"
RAW = "data/raw/{dataset}.h5ad"
PROCESSED = "data/processed/{dataset}.h5ad"
PREPROCESS_REPORT = "results/preprocess/{dataset}.json"
COLLECTION = "results/collection.json"
GENE_POSITIONS = "data/main/gene_positions.parquet"
GENE_EMBEDDINGS = "data/main/gene_embeddings.parquet"
MISSING_PROTEINS = "results/gene_embeddings_missing.tsv"
DEMO_DIR = "resources/demo"
TINY_ESM = "resources/tiny-esm2"
RUN = config["train"]["run"]
CHECKPOINT = f"checkpoints/{RUN}/last.ckpt"
TRAIN_SUMMARY = f"results/train/{RUN}.json"
FINETUNE = config["finetune"]["name"]
FINETUNE_SUMMARY = f"results/finetune/{FINETUNE}.json"
TRAIN_METRICS = f"results/train/{RUN}_metrics.csv"
REPORT_DIR = "results/report"


wildcard_constraints:
    dataset=r"[A-Za-z0-9][A-Za-z0-9._-]*",


def all_outputs():
    return [
        ONTOLOGIES,
        COLLECTION,
        GENE_POSITIONS,
        GENE_EMBEDDINGS,
        CHECKPOINT,
        TRAIN_SUMMARY,
        *([FINETUNE_SUMMARY] if FINETUNE else []),
    ]


def organism_args():
    return " ".join(f"--organism {o}" for o in config["organisms"])


def repeated(flag, values):
    """`--flag v1 --flag v2` for list-valued config, quoted for the shell."""
    return " ".join(f"{flag} {shell_quote(v)}" for v in values)


def shell_quote(value):
    return shlex.quote(str(value))


def lamin_db_arg():
    db = config["lamin"]["db"]
    return f"--db {shell_quote(db)}" if db else ""


def dataset_source_dir():
    source = config["datasets"]["source"]
    if source == "demo":
        return f"{DEMO_DIR}/datasets"
    if source == "local":
        return config["datasets"]["local_dir"]
    return None


def listing_inputs(wildcards):
    return [f"{DEMO_DIR}/demo.json"] if config["datasets"]["source"] == "demo" else []


def listing_args():
    ds = config["datasets"]
    source = ds["source"] if ds["source"] in ("cellxgene", "census") else "local"
    args = [f"--source {source}", organism_args(), f"--min-cells {ds['min_cells']}"]
    if source == "cellxgene":
        args.append(f"--api {shell_quote(ds['cellxgene_api'])}")
    elif source == "census":
        args.append(f"--census-version {shell_quote(ds['census_version'])}")
        for key in ("census_uri", "census_h5ads"):
            if ds.get(key):
                args.append(f"--{key.replace('_', '-')} {shell_quote(ds[key])}")
    else:
        args.append(f"--local-dir {shell_quote(dataset_source_dir())}")
    args += [repeated("--assay", ds["assays"]), repeated("--include", ds["include"])]
    args.append(repeated("--exclude", ds["exclude"]))
    if ds["limit"] is not None:
        args.append(f"--limit {ds['limit']}")
    return " ".join(a for a in args if a)


def dataset_ids():
    """Dataset ids from the listing (a checkpoint: known once list_datasets has run)."""
    listing = checkpoints.list_datasets.get().output.tsv
    return pd.read_csv(listing, sep="\t", dtype=str)["dataset_id"].tolist()


def processed_datasets(wildcards):
    return expand(PROCESSED, dataset=dataset_ids())


def preprocess_reports(wildcards):
    return expand(PREPROCESS_REPORT, dataset=dataset_ids())


def listing_rows(wildcards):
    """Each dataset's listing row: the collection records the version it was built from."""
    return expand(DATASET_ROW, dataset=dataset_ids())


# Resources that follow the data (Slurm): each dataset's memory and runtime come from its
# listing row (cells, bytes) and grow with Snakemake's `attempt`, so a job killed for
# memory or time is resubmitted bigger (profiles/slurm: retries). Formulas: scprint/plan.py,
# the same ones `scprint plan` prints.
def dataset_resource(stage, resource):
    from scprint.plan import job_resources

    def get(wildcards, attempt):
        row = DATASET_ROW.format(dataset=wildcards.dataset)
        return job_resources(stage, row, attempt)[resource]

    return get


def listed_datasets():
    """Datasets in the listing; 0 before the listing exists (a dry run)."""
    if not Path(DATASETS).exists():
        return 0
    return len(pd.read_csv(DATASETS, sep="\t", usecols=["dataset_id"]))


def collection_mem_mb(wildcards, attempt):
    from scprint.plan import collection_mem_mb

    return collection_mem_mb(listed_datasets(), attempt)


def collection_runtime(wildcards, attempt):
    from scprint.plan import collection_runtime_min

    return collection_runtime_min(listed_datasets(), attempt)


def preprocess_settings():
    """config["preprocess"], with the named preset's values over it when one is set."""
    settings = dict(config["preprocess"])
    preset = settings.pop("preset", None)
    if preset is None:
        return settings
    presets = config.get("preprocess_presets", {})
    if preset not in presets:
        raise ValueError(
            f"preprocess.preset {preset!r} is not under preprocess_presets "
            f"(there: {sorted(presets)}): fix the name in the config"
        )
    return {**settings, **presets[preset]}


def preprocess_args():
    p = preprocess_settings()
    flags = [
        f"--min-valid-genes-id {p['min_valid_genes_id']}",
        f"--min-nnz-genes {p['min_nnz_genes']}",
        f"--min-dataset-size {p['min_dataset_size']}",
        f"--maxdropamount {p['maxdropamount']}",
        "--is-symbol" if p["is_symbol"] else "--no-is-symbol",
        "--skip-validate" if p["skip_validate"] else "--no-skip-validate",
        "--do-postp" if p.get("do_postp", False) else "--no-do-postp",
        "--primary-only" if p["primary_only"] else "--no-primary-only",
    ]
    return " ".join(flags)


def embedding_model_inputs(wildcards):
    """The ESM2 weights when they are a local folder (the tiny demo model is built here)."""
    model = config["gene_embeddings"]["model"]
    return [model] if model == TINY_ESM or Path(model).exists() else []


def fasta_files():
    """organism -> local FASTA; the demo's come from the demo_data rule."""
    fasta = dict(config["gene_embeddings"]["fasta"])
    if config["datasets"]["source"] == "demo":
        for organism, species in (
            ("NCBITaxon:9606", "homo_sapiens"),
            ("NCBITaxon:10090", "mus_musculus"),
        ):
            fasta.setdefault(organism, f"{DEMO_DIR}/proteins/{species}.pep.fa.gz")
    return {org: path for org, path in fasta.items() if org in config["organisms"]}


def embedding_fasta_inputs(wildcards):
    return [path for path in fasta_files().values() if "://" not in path]


def embedding_args():
    e = config["gene_embeddings"]
    args = [
        organism_args(),
        f"--model {shell_quote(e['model'])}",
        f"--fasta-base-url {shell_quote(e['fasta_base_url'])}",
        f"--max-tokens-per-batch {e['max_tokens_per_batch']}",
        repeated("--fasta", [f"{org}={path}" for org, path in fasta_files().items()]),
    ]
    return " ".join(a for a in args if a)


def init_from_inputs(wildcards):
    """train.init_from: the checkpoint the run starts from (none: [])."""
    return [config["train"]["init_from"]] if config["train"].get("init_from") else []


def train_args():
    from scprint.slurm import trainer_args

    t = config["train"]
    args = [repeated("--config", t["configs"])]
    # Lightning's num_nodes/devices from the same keys as the Slurm request (train_slurm)
    shape = trainer_args(t["nodes"], t["gpus_per_node"])
    if t.get("init_from"):
        args.append(f"--init-from {shell_quote(t['init_from'])}")
    args.append("-- " + " ".join(shell_quote(a) for a in [*shape, *t["args"]]))
    return " ".join(args)


def train_slurm(resource):
    """One resource of the train job's Slurm request (scprint.slurm.train_resources)."""
    from scprint.slurm import train_resources

    t = config["train"]
    return train_resources(
        t["nodes"], t["gpus_per_node"], t["gpu_model"], t["gpu_memory"]
    )[resource]


def finetune_checkpoint():
    """The configured checkpoint, or this workflow's trained one."""
    return config["finetune"]["checkpoint"] or CHECKPOINT


def finetune_h5ad(wildcards):
    """The labeled files; processed ones wait for the listing (a checkpoint), as the
    collection does, so the DAG has the same shape with or without fine-tuning."""
    files = config["finetune"]["h5ad"]
    if any(Path(f).parent == Path(PROCESSED).parent for f in files):
        dataset_ids()
    return files


def finetune_args():
    f = config["finetune"]
    args = [
        f"--data.h5ad {shell_quote(json.dumps(f['h5ad']))}",
        f"--data.label_key {shell_quote(f['label_key'])}",
    ]
    args += [
        f"--lora.{key} {shell_quote(json.dumps(value))}"
        for key, value in f["lora"].items()
    ]
    args += [shell_quote(a) for a in f["args"]]
    return " ".join(args)
