rule demo_data:
    output:
        f"{DEMO_DIR}/demo.json",
        expand(f"{DEMO_DIR}/proteins/{{species}}.pep.fa.gz", species=["homo_sapiens", "mus_musculus"]),
    params:
        out=lambda wildcards, output: Path(output[0]).parent,
    log:
        "logs/demo_data/demo_data.log",
    conda:
        "../../envs/data.yaml"
    shell:
        "python -m scprint demo-data --out {params.out} > {log} 2>&1"


checkpoint list_datasets:
    input:
        listing_inputs,
    output:
        tsv=DATASETS,
    params:
        args=listing_args(),
    log:
        "logs/list_datasets/list_datasets.log",
    conda:
        "../../envs/data.yaml"
    shell:
        "python -m scprint list-datasets {params.args} --out {output.tsv} > {log} 2>&1"


rule download:
    input:
        DATASETS,
    output:
        RAW,
    params:
        retries=config["download"]["retries"],
        timeout=config["download"]["timeout_s"],
    log:
        "logs/download/{dataset}.log",
    conda:
        "../../envs/data.yaml"
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
    params:
        args=preprocess_args(),
    log:
        "logs/preprocess/{dataset}.log",
    conda:
        "../../envs/data.yaml"
    shell:
        "python -m scprint preprocess --dataset {wildcards.dataset} --input {input.raw}"
        " --out {output.h5ad} --report {output.report} {params.args} > {log} 2>&1"


rule collection:
    input:
        processed=processed_datasets,
        reports=preprocess_reports,
    output:
        COLLECTION,
    params:
        key=config["collection"]["key"],
    log:
        "logs/collection/collection.log",
    conda:
        "../../envs/data.yaml"
    shell:
        "python -m scprint collection --processed {input.processed} --key {params.key:q}"
        " --out {output} > {log} 2>&1"
