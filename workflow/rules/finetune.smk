rule finetune:
    input:
        checkpoint=finetune_checkpoint(),
        h5ad=finetune_h5ad,
        config=config["finetune"]["config"],
    output:
        adapter=directory(f"checkpoints/finetune/{FINETUNE}/adapter"),
        merged=f"checkpoints/finetune/{FINETUNE}/merged.ckpt",
        summary=FINETUNE_SUMMARY,
    log:
        f"logs/finetune/{FINETUNE}.log",
    conda:
        "../../envs/train.yaml"
    threads: 4
    params:
        name=FINETUNE,
        args=finetune_args(),
    shell:
        # training state (checkpoints/finetune/<name>/state.pt, not an output, so a
        # rerun after a failure or requeue resumes from its last finished epoch)
        "python -m scprint finetune --config {input.config} --name {params.name}"
        " --checkpoint {input.checkpoint} --out_dir checkpoints/finetune/{params.name}"
        " --summary {output.summary} {params.args} > {log} 2>&1"
