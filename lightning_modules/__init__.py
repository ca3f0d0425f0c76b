"""Training toolkit around ``llsa``: config schema, data, LightningModule, callbacks, FID and the run commands."""
from lightning_modules.config import Config, ConfigError, load_config
from lightning_modules.data import DataNotFoundError, ImageDataModule, build_dataset
from lightning_modules.module import DiffusionModule

__all__ = ["Config", "ConfigError", "load_config", "DataNotFoundError", "ImageDataModule", "build_dataset",
           "DiffusionModule"]
