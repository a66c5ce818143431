# Figures for `snakemake --report report.html`: one rule per report category, each a thin
# call of `scprint report-<category>` on what the stages wrote (scprint/report/). The
# report itself then only collects these files; it recomputes nothing.


rule report_datasets:
    input:
        reports=preprocess_reports,
        processed=processed_datasets,
    output:
        table=report(
            f"{REPORT_DIR}/datasets/datasets.html",
            caption="../report/datasets_table.rst",
            category="Datasets",
            labels={"figure": "dataset table"},
        ),
        cells=report(
            f"{REPORT_DIR}/datasets/cells.png",
            caption="../report/datasets_cells.rst",
            category="Datasets",
            labels={"figure": "cells kept and dropped"},
        ),
        qc=report(
            f"{REPORT_DIR}/datasets/qc.png",
            caption="../report/datasets_qc.rst",
            category="Datasets",
            labels={"figure": "counts and genes per cell"},
        ),
    log:
        "logs/report_datasets/report_datasets.log",
    conda:
        "../../envs/data.yaml"
    shell:
        "python -m scprint report-datasets --reports {input.reports}"
        " --processed {input.processed} --table {output.table} --cells {output.cells}"
        " --qc {output.qc} > {log} 2>&1"


rule report_collection:
    input:
        collection=COLLECTION,
        processed=processed_datasets,
        configs=config["train"]["configs"],
    output:
        composition=report(
            f"{REPORT_DIR}/collection/composition.png",
            caption="../report/collection_composition.rst",
            category="Collection",
            labels={"figure": "composition"},
        ),
        sampler=report(
            f"{REPORT_DIR}/collection/sampler.png",
            caption="../report/collection_sampler.rst",
            category="Collection",
            labels={"figure": "weighted sampler"},
        ),
    log:
        "logs/report_collection/report_collection.log",
    conda:
        "../../envs/data.yaml"
    params:
        configs=lambda wildcards, input: repeated("--train-config", input.configs),
    shell:
        "python -m scprint report-collection --collection {input.collection}"
        " --processed {input.processed} {params.configs}"
        " --composition {output.composition} --sampler {output.sampler} > {log} 2>&1"


rule report_genes:
    input:
        positions=GENE_POSITIONS,
        embeddings=GENE_EMBEDDINGS,
        missing=MISSING_PROTEINS,
    output:
        coverage=report(
            f"{REPORT_DIR}/genes/coverage.png",
            caption="../report/genes_coverage.rst",
            category="Genes",
            labels={"figure": "embedding coverage"},
        ),
        chromosomes=report(
            f"{REPORT_DIR}/genes/chromosomes.png",
            caption="../report/genes_chromosomes.rst",
            category="Genes",
            labels={"figure": "genes per chromosome"},
        ),
    log:
        "logs/report_genes/report_genes.log",
    conda:
        "../../envs/embed.yaml"
    shell:
        "python -m scprint report-genes --positions {input.positions}"
        " --embeddings {input.embeddings} --missing {input.missing}"
        " --coverage {output.coverage} --chromosomes {output.chromosomes} > {log} 2>&1"


rule report_training:
    input:
        summary=TRAIN_SUMMARY,
        metrics=TRAIN_METRICS,
    output:
        curves=report(
            f"{REPORT_DIR}/training/curves.png",
            caption="../report/training_curves.rst",
            category="Training",
            labels={"figure": "losses and validation metrics"},
        ),
        lr=report(
            f"{REPORT_DIR}/training/lr_throughput.png",
            caption="../report/training_lr_throughput.rst",
            category="Training",
            labels={"figure": "learning rate and throughput"},
        ),
        table=report(
            f"{REPORT_DIR}/training/checkpoint.html",
            caption="../report/training_checkpoint.rst",
            category="Training",
            labels={"figure": "final checkpoint"},
        ),
    log:
        "logs/report_training/report_training.log",
    conda:
        "../../envs/train.yaml"
    shell:
        "python -m scprint report-training --summary {input.summary}"
        " --metrics {input.metrics} --curves {output.curves}"
        " --lr-throughput {output.lr} --table {output.table} > {log} 2>&1"
