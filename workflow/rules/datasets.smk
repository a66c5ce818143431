rule demo_data:
    output:
        f"{DEMO_DIR}/demo.json",
        expand(
            f"{DEMO_DIR}/proteins/{{species}}.pep.fa.gz",
            species=["homo_sapiens", "mus_musculus"],
        ),
    log:
        "logs/demo_data/demo_data.log",
    conda:
        "../../envs/data.yaml"
    params:
        out=lambda wildcards, output: Path(output[0]).parent,
    shell:
        "python -m scprint demo-data --out {params.out} > {log} 2>&1"


checkpoint list_datasets:
    input:
        listing_inputs,
    output:
        tsv=DATASETS,
    log:
        "logs/list_datasets/list_datasets.log",
    conda:
        "../../envs/data.yaml"
    params:
        args=listing_args(),
        rows=DATASET_ROWS,
    shell:
        "python -m scprint list-datasets {params.args} --out {output.tsv}"
        " --rows-dir {params.rows} > {log} 2>&1"


rule plan:
    input:
        listing=DATASETS,
        configs=config["train"]["configs"],
    output:
        "results/plan.json",
    log:
        "logs/plan/plan.log",
    conda:
        "../../envs/data.yaml"
    params:
        configs=lambda wildcards, input: repeated("--config", input.configs),
        # the train job's shape: the bill counts every GPU it holds
        nodes=config["train"]["nodes"],
        gpus_per_node=config["train"]["gpus_per_node"],
    shell:
        "python -m scprint plan --listing {input.listing} {params.configs} --out {output}"
        " --nodes {params.nodes} --gpus-per-node {params.gpus_per_node} 2>&1 | tee {log}"


# On Slurm, several datasets' downloads (and, separately, preprocessings) go to the
# cluster as one job, run one after another inside it: profiles/slurm's group-components
# sets how many (docs/slurm.md "Many datasets"). Local runs ignore groups.
rule download:
    input:
        DATASET_ROW,
    output:
        RAW,
    log:
        "logs/download/{dataset}.log",
    group:
        "downloads"
    conda:
        "../../envs/data.yaml"
    resources:
        dataset_slots=1,
        mem_mb=dataset_resource("download", "mem_mb"),
        runtime=dataset_resource("download", "runtime"),
    params:
        retries=config["download"]["retries"],
        timeout=config["download"]["timeout_s"],
    shell:
        "python -m scprint download --listing {input} --dataset {wildcards.dataset}"
        " --out {output} --retries {params.retries} --timeout {params.timeout} > {log} 2>&1"


rule preprocess:
    input:
        raw=RAW,
        ontologies=ONTOLOGIES,
    output:
        h5ad=PROCESSED,
        report=PREPROCESS_REPORT,
    log:
        "logs/preprocess/{dataset}.log",
    group:
        "preprocessing"
    conda:
        "../../envs/data.yaml"
    resources:
        dataset_slots=1,
        mem_mb=dataset_resource("preprocess", "mem_mb"),
        runtime=dataset_resource("preprocess", "runtime"),
    params:
        args=preprocess_args(),
    shell:
        "python -m scprint preprocess --dataset {wildcards.dataset} --input {input.raw}"
        " --out {output.h5ad} --report {output.report} {params.args} --on-refused record"
        " > {log} 2>&1"


rule collection:
    input:
        processed=processed_datasets,
        reports=preprocess_reports,
        rows=listing_rows,
    output:
        COLLECTION,
    log:
        "logs/collection/collection.log",
    conda:
        "../../envs/data.yaml"
    resources:
        mem_mb=collection_mem_mb,
        runtime=collection_runtime,
    params:
        key=config["collection"]["key"],
        on_refused=config["datasets"]["on_refused"],
    shell:
        "python -m scprint collection --processed {input.processed} --key {params.key:q}"
        " --listing {input.rows} --on-refused {params.on_refused} --out {output} > {log} 2>&1"
