"""The labelled downstream tasks (data.py), fine-tuning and task distillation (finetune.py) and their
configuration, evaluate.downstream (config.py): the library the task stages and evaluate share."""
