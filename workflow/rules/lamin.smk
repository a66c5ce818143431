rule lamin_instance:
    output:
        LAMIN_INSTANCE,
    log:
        "logs/lamin_instance/lamin_instance.log",
    conda:
        "../../envs/data.yaml"
    params:
        name=config["lamin"]["name"],
        storage=config["lamin"]["storage"],
        db=lamin_db_arg(),
    shell:
        "python -m scprint lamin-init --name {params.name} --storage {params.storage:q}"
        " {params.db} --out {output} > {log} 2>&1"


rule ontologies:
    input:
        LAMIN_INSTANCE,
    output:
        ONTOLOGIES,
    log:
        "logs/ontologies/ontologies.log",
    conda:
        "../../envs/data.yaml"
    params:
        source=config["ontologies"]["source"],
        organisms=organism_args(),
    shell:
        "python -m scprint ontologies --source {params.source} {params.organisms}"
        " --out {output} > {log} 2>&1"
