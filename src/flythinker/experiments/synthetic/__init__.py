"""The deterministic synthetic personalized dataset of `flythinker demo`."""

from .generator import DemoDataConfig, make_demo_dataset, user_styles, write_demo_dataset

__all__ = ["DemoDataConfig", "make_demo_dataset", "user_styles", "write_demo_dataset"]
