"""What the zoo knows about each dataset without touching its files: classes and preprocessing."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .config import PreprocessConfig

FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
CIFAR10_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]
CIFAR100_CLASSES = """apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge
bus butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab
crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp
lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree
orange orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit
raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail snake spider squirrel
streetcar sunflower sweet_pepper table tank telephone television tiger tractor train trout tulip
turtle wardrobe whale willow_tree wolf woman worm""".split()


def _imagenet_classes() -> list[str]:
    import torchvision.models as tvm

    return list(tvm.ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


IMAGENET_PREPROCESS: dict[str, Any] = dict(
    input_size=(224, 224),
    channels=3,
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
    resize="resize_crop",
    crop_pct=0.875,
)
CIFAR_PREPROCESS: dict[str, Any] = dict(
    input_size=(32, 32), channels=3, mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010)
)


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset: how many classes, their names, the input pipeline."""

    name: str
    num_classes: int
    preprocess: dict = field(default_factory=dict)
    class_names_fn: str = (
        ""  # name of a function here, resolved lazily (ImageNet needs torchvision)
    )

    def class_names(self) -> list[str]:
        table = {
            "fashion_mnist": FASHION_MNIST_CLASSES,
            "cifar10": CIFAR10_CLASSES,
            "cifar100": CIFAR100_CLASSES,
        }
        if self.class_names_fn in table:
            return list(table[self.class_names_fn])
        if self.class_names_fn == "imagenet":
            return _imagenet_classes()
        # Places-LT and iNat18 names come from the user's split files at training time.
        return [f"class_{i}" for i in range(self.num_classes)]

    def preprocess_config(self) -> PreprocessConfig:
        return PreprocessConfig(**self.preprocess)


DATASETS: dict[str, DatasetInfo] = {
    # light garments on black: transparent pixels are composited onto black
    "fashion_mnist_lt": DatasetInfo("fashion_mnist_lt", 10, {"background": 0}, "fashion_mnist"),
    "cifar10_lt": DatasetInfo("cifar10_lt", 10, CIFAR_PREPROCESS, "cifar10"),
    "cifar100_lt": DatasetInfo("cifar100_lt", 100, CIFAR_PREPROCESS, "cifar100"),
    "imagenet_lt": DatasetInfo("imagenet_lt", 1000, IMAGENET_PREPROCESS, "imagenet"),
    "places_lt": DatasetInfo("places_lt", 365, IMAGENET_PREPROCESS, ""),
    "inat2018": DatasetInfo("inat2018", 8142, IMAGENET_PREPROCESS, ""),
}
