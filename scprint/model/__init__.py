"""The scPRINT model: the network (model.py), its losses and objectives, the LightningModule."""
