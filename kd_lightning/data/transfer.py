"""Transfer-learning datamodules: the four target datasets of DUPS (Sec. 4.1, Table 4).

* :class:`Flowers102DataModule`, :class:`FGVCAircraftDataModule` and :class:`DTDDataModule` read the official
  archives, unpacked under ``data_dir``, with torchvision's dataset classes (their parsing is the loading code);
* :class:`CUB200DataModule` reads CUB-200-2011's released folder layout (``CUB_200_2011/images.txt``,
  ``image_class_labels.txt``, ``train_test_split.txt``, ``classes.txt``, ``images/``).

Nothing is downloaded unless ``download=True`` (then :meth:`~TorchvisionTransferDataModule.prepare_data` fetches the
archive once). Images go through the ImageNet transforms of :mod:`kd_lightning.data.transforms` ("exactly the same data
augmentation methods as in ImageNet classification", DUPS Sec. 4.2) and are normalised with the ImageNet statistics, as
the ImageNet-pretrained weights expect. The training pool is the official training split, or training + validation
(``train_split="trainval"``, the default: the usual protocol for these datasets when reporting test accuracy); the test
set is the official test split. ``val_size`` images of the pool can be held out for validation (seeded, stratified).
"""

from __future__ import annotations

import os
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.datasets import DTD, FGVCAircraft, Flowers102, VisionDataset
from torchvision.datasets.utils import download_and_extract_archive
from typing_extensions import override

from kd_lightning.data.image_files import ImageFileDataModule, ImageFiles

__all__ = [
    "CUB200DataModule",
    "DTDDataModule",
    "FGVCAircraftDataModule",
    "Flowers102DataModule",
    "TorchvisionTransferDataModule",
]

TrainSplit = Literal["train", "trainval"]

#: CUB-200-2011's archive on CaltechDATA and its MD5.
CUB_URL = "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz"
CUB_MD5 = "97eceeb196236b17998738112f37df78"


class TorchvisionTransferDataModule(ImageFileDataModule):
    """Shared machinery of the datamodules on a torchvision dataset class with ``train``/``val``/``test`` splits.

    A subclass names the class (:attr:`dataset_class`), its folder under ``data_dir``, the files it expects and its
    number of classes, and may add keyword arguments of the class (:meth:`_dataset_kwargs`).

    Args:
        data_dir: Folder that holds (or receives) the unpacked archive.
        download: Let :meth:`prepare_data` download the archive when it is missing (nothing is downloaded otherwise).
        train_split: ``"trainval"`` (training + validation splits, default) or ``"train"``.
        batch_size: Training batch size, per process under DDP (64: DUPS Sec. 4.2).
        **kwargs: The options of :class:`~kd_lightning.data.image_files.ImageFileDataModule` (crops,
            normalisation, ``strict``, workers) and :class:`~kd_lightning.data.base.ClassificationDataModule`
            (``val_size``, seeds, ``views``).
    """

    #: The torchvision dataset class.
    dataset_class: ClassVar[type[VisionDataset]]
    #: Folder of the unpacked archive under ``data_dir``.
    folder_name: ClassVar[str]
    #: What the folder must contain, for error messages.
    expected_layout: ClassVar[str]
    #: Where the archive comes from, for error messages.
    source: ClassVar[str]

    def __init__(
        self,
        data_dir: str = "data",
        download: bool = False,
        train_split: TrainSplit = "trainval",
        *,
        batch_size: int = 64,
        **kwargs: Any,
    ) -> None:
        if train_split not in ("train", "trainval"):
            raise ValueError(f"train_split must be 'train' or 'trainval', got {train_split!r}.")
        super().__init__(batch_size=batch_size, **kwargs)
        self.data_dir = str(data_dir)
        self.download = download
        self.train_split = train_split

    @property
    def folder(self) -> str:
        """The folder of the unpacked archive."""
        return os.path.join(self.data_dir, self.folder_name)

    def _dataset_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments of :attr:`dataset_class` (annotation level, partition ...)."""
        return {}

    def _train_splits(self) -> list[str]:
        return ["train", "val"] if self.train_split == "trainval" else ["train"]

    @override
    def prepare_data(self) -> None:
        """Download and unpack the archive into ``data_dir`` when ``download=True`` (and it is missing)."""
        if self.download:
            self.dataset_class(self.data_dir, split="test", download=True, **self._dataset_kwargs())

    def _open(self, split: str) -> VisionDataset:
        try:
            return self.dataset_class(self.data_dir, split=split, **self._dataset_kwargs())
        except (RuntimeError, FileNotFoundError) as err:
            raise RuntimeError(
                f"{self.dataset_class.__name__} not found or incomplete in {os.path.abspath(self.folder)} ({err}): "
                f"expected {self.expected_layout}. Pass download=True to download it ({self.source}), or unpack the "
                f"official archive into {os.path.abspath(self.data_dir)}."
            ) from err

    def _load_train_pool(self) -> tuple[Dataset, Tensor]:
        pool = _image_files(*[self._open(split) for split in self._train_splits()])
        return pool, pool.label_tensor()

    def _load_test_set(self) -> Dataset:
        return _image_files(self._open("test"))


def _image_files(*parts: VisionDataset) -> ImageFiles:
    """The samples of torchvision Flowers102 / FGVCAircraft / DTD splits, one after the other, as :class:`ImageFiles`.

    torchvision parses the split files; the images are then read by :func:`~kd_lightning.data.image_files.load_rgb`
    (unreadable files named, see :class:`~kd_lightning.data.image_files.SkipUnreadable`). These classes keep their file
    list and labels in ``_image_files`` and ``_labels`` (no public accessor; present since torchvision 0.12, while
    their ``loader`` argument only exists from 0.22).
    """
    paths = [os.fspath(path) for part in parts for path in part._image_files]  # type: ignore[attr-defined]
    labels = [label for part in parts for label in part._labels]  # type: ignore[attr-defined]
    return ImageFiles("", paths, labels)


class Flowers102DataModule(TorchvisionTransferDataModule):
    """Oxford 102 Flowers (Nilsback & Zisserman 2008): 8,189 images of 102 flower species.

    Official splits: 1,020 training, 1,020 validation (10 images per class each) and 6,149 test images. Read by
    torchvision's :class:`~torchvision.datasets.Flowers102` from ``<data_dir>/flowers-102/`` (``jpg/``,
    ``imagelabels.mat``, ``setid.mat``; scipy reads the ``.mat`` files: the ``transfer`` extra). Arguments: see
    :class:`TorchvisionTransferDataModule`.
    """

    dataset_class = Flowers102
    folder_name = "flowers-102"
    expected_layout = (
        "flowers-102/jpg/image_00001.jpg ... image_08189.jpg, flowers-102/imagelabels.mat, flowers-102/setid.mat"
    )
    source = "102flowers.tgz, imagelabels.mat and setid.mat from https://www.robots.ox.ac.uk/~vgg/data/flowers/102/"

    @property
    def num_classes(self) -> int:
        return 102


class DTDDataModule(TorchvisionTransferDataModule):
    """Describable Textures Dataset (Cimpoi et al. 2014): 5,640 images of 47 texture classes.

    Each of the 10 official partitions splits every class into 40 training, 40 validation and 40 test images. Read
    by torchvision's :class:`~torchvision.datasets.DTD` from ``<data_dir>/dtd/dtd/`` (``images/<class>/``,
    ``labels/train<p>.txt``, ``val<p>.txt``, ``test<p>.txt``): the archive ``dtd-r1.0.1.tar.gz`` unpacked into
    ``<data_dir>/dtd/``.

    Args:
        partition: The official partition, 1 to 10.
        **kwargs: See :class:`TorchvisionTransferDataModule`.

    Raises:
        ValueError: ``partition`` outside 1..10; at set-up, splits that do not list the same classes.
    """

    dataset_class = DTD
    folder_name = os.path.join("dtd", "dtd")
    expected_layout = "dtd/dtd/images/<class>/<image>.jpg and dtd/dtd/labels/{train,val,test}<partition>.txt"
    source = "dtd-r1.0.1.tar.gz from https://www.robots.ox.ac.uk/~vgg/data/dtd/"

    def __init__(self, partition: int = 1, **kwargs: Any) -> None:
        if not 1 <= partition <= 10:
            raise ValueError(f"partition must be in 1..10 (DTD's official partitions), got {partition}.")
        super().__init__(**kwargs)
        self.partition = partition

    @property
    def num_classes(self) -> int:
        return 47

    def _dataset_kwargs(self) -> dict[str, Any]:
        return {"partition": self.partition}

    def _load_train_pool(self) -> tuple[Dataset, Tensor]:
        # torchvision numbers DTD's classes per split file (sorted names of that file): check they agree.
        parts = [self._open(split) for split in self._train_splits()]
        test_classes = self._open("test").classes
        for split, part in zip(self._train_splits(), parts, strict=True):
            if part.classes != test_classes:
                raise ValueError(
                    f"DTD's {split}{self.partition}.txt and test{self.partition}.txt in {self.folder}/labels list "
                    f"different classes ({len(part.classes)} and {len(test_classes)}): the labels would disagree"
                )
        pool = _image_files(*parts)
        return pool, pool.label_tensor()


class FGVCAircraftDataModule(TorchvisionTransferDataModule):
    """FGVC-Aircraft (Maji et al. 2013): 10,000 aircraft images of 100 variants, 70 families, 30 manufacturers.

    Official splits: 3,334 training, 3,333 validation and 3,333 test images. Read by torchvision's
    :class:`~torchvision.datasets.FGVCAircraft` from ``<data_dir>/fgvc-aircraft-2013b/data/`` (``images/``,
    ``variants.txt``, ``images_variant_{train,val,trainval,test}.txt`` ... for each annotation level). The images
    are used whole, as torchvision loads them (with the 20-pixel copyright banner at the bottom).

    :attr:`superclass_map` maps each class to the next coarser level (variant -> family, family -> manufacturer),
    read from the annotation files, for the ``rel`` targets of :class:`~kd_lightning.DistillModule`.

    Args:
        annotation_level: ``"variant"`` (100 classes, the usual benchmark), ``"family"`` (70) or ``"manufacturer"``
            (30).
        **kwargs: See :class:`TorchvisionTransferDataModule`.

    Raises:
        ValueError: an unknown ``annotation_level``.
    """

    dataset_class = FGVCAircraft
    folder_name = "fgvc-aircraft-2013b"
    expected_layout = (
        "fgvc-aircraft-2013b/data/images/<id>.jpg, data/variants.txt (families.txt, manufacturers.txt) and "
        "data/images_variant_{train,val,trainval,test}.txt (idem for family, manufacturer)"
    )
    source = "fgvc-aircraft-2013b.tar.gz from https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/"
    #: Classes per annotation level, and the files that list them.
    LEVELS: ClassVar[dict[str, tuple[int, str]]] = {
        "variant": (100, "variants.txt"),
        "family": (70, "families.txt"),
        "manufacturer": (30, "manufacturers.txt"),
    }
    #: The next coarser level of each annotation level.
    COARSER: ClassVar[dict[str, str]] = {"variant": "family", "family": "manufacturer"}

    def __init__(self, annotation_level: Literal["variant", "family", "manufacturer"] = "variant", **kwargs: Any):
        if annotation_level not in self.LEVELS:
            raise ValueError(f"annotation_level must be one of {list(self.LEVELS)}, got {annotation_level!r}.")
        super().__init__(**kwargs)
        self.annotation_level = annotation_level
        self._superclass_map: Tensor | None = None

    @property
    def num_classes(self) -> int:
        return self.LEVELS[self.annotation_level][0]

    def _dataset_kwargs(self) -> dict[str, Any]:
        return {"annotation_level": self.annotation_level}

    def _train_splits(self) -> list[str]:
        return [self.train_split]  # the archive has a trainval list of its own

    @property
    def superclass_map(self) -> Tensor | None:
        """``(num_classes,)``: the family of each variant (or the manufacturer of each family); None for
        ``annotation_level="manufacturer"``. Read from the annotation files of all images (trainval and test)."""
        coarser = self.COARSER.get(self.annotation_level)
        if coarser is None:
            return None
        if self._superclass_map is None:
            data = os.path.join(self.folder, "data")
            fine_names = _read_lines(os.path.join(data, self.LEVELS[self.annotation_level][1]))
            coarse_names = _read_lines(os.path.join(data, self.LEVELS[coarser][1]))
            fine_index = {name: i for i, name in enumerate(fine_names)}
            coarse_index = {name: i for i, name in enumerate(coarse_names)}
            mapping = torch.full((len(fine_names),), -1, dtype=torch.long)
            for split in ("trainval", "test"):
                fine = _image_labels(os.path.join(data, f"images_{self.annotation_level}_{split}.txt"))
                coarse = _image_labels(os.path.join(data, f"images_{coarser}_{split}.txt"))
                for image, name in fine.items():
                    f, c = fine_index[name], coarse_index[coarse[image]]
                    if mapping[f] not in (-1, c):
                        raise ValueError(
                            f"FGVC-Aircraft {self.annotation_level} {name!r} belongs to two {coarser} classes "
                            f"({coarse_names[int(mapping[f])]!r} and {coarse_names[c]!r}) in {data}"
                        )
                    mapping[f] = c
            missing = [fine_names[i] for i in (mapping < 0).nonzero().flatten().tolist()]
            if missing:
                raise ValueError(f"FGVC-Aircraft {self.annotation_level}(s) without any image in {data}: {missing[:5]}")
            self._superclass_map = mapping
        return self._superclass_map


def _read_lines(path: str) -> list[str]:
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def _image_labels(path: str) -> dict[str, str]:
    """``{image id: class name}`` of an FGVC-Aircraft ``images_<level>_<split>.txt`` (``"<id> <name>"`` lines)."""
    return dict(line.split(" ", 1) for line in _read_lines(path))


class CUB200DataModule(ImageFileDataModule):
    """Caltech-UCSD Birds-200-2011 (Wah et al. 2011): 11,788 images of 200 bird species, 5,994 train / 5,794 test.

    Read from the released folder layout under ``<data_dir>/CUB_200_2011/``:

    * ``images.txt``: ``<image id> <relative path>`` lines, paths under ``images/`` (``001.Black_footed_Albatross/
      Black_Footed_Albatross_0046_18.jpg``);
    * ``image_class_labels.txt``: ``<image id> <class id>``, class ids 1..200;
    * ``train_test_split.txt``: ``<image id> <1 for training, 0 for test>``;
    * ``classes.txt``: ``<class id> <class name>``.

    The training pool is the official training split (CUB has no validation split; hold one out with ``val_size``).

    Args:
        data_dir: Folder that holds (or receives) ``CUB_200_2011/``.
        download: Let :meth:`prepare_data` download ``CUB_200_2011.tgz`` (1.1 GB, from CaltechDATA, MD5-checked)
            when ``images.txt`` is missing.
        **kwargs: See :class:`~kd_lightning.data.image_files.ImageFileDataModule` (``batch_size`` defaults to 64).

    Raises:
        RuntimeError: (at set-up) files of the layout are missing; ValueError: the files disagree.
    """

    REQUIRED: ClassVar[tuple[str, ...]] = (
        "images.txt",
        "image_class_labels.txt",
        "train_test_split.txt",
        "classes.txt",
    )

    def __init__(self, data_dir: str = "data", download: bool = False, batch_size: int = 64, **kwargs: Any) -> None:
        super().__init__(batch_size=batch_size, **kwargs)
        self.data_dir = str(data_dir)
        self.download = download
        self._splits: tuple[list[str], ImageFiles, ImageFiles] | None = None

    @property
    def folder(self) -> str:
        """``<data_dir>/CUB_200_2011``."""
        return os.path.join(self.data_dir, "CUB_200_2011")

    @property
    def num_classes(self) -> int:
        return 200

    @property
    def classes(self) -> list[str]:
        """Class names in label order (``classes.txt``), e.g. ``"001.Black_footed_Albatross"``."""
        return self._read()[0]

    @override
    def prepare_data(self) -> None:
        """Download and unpack ``CUB_200_2011.tgz`` into ``data_dir`` when ``download=True`` and it is missing."""
        if self.download and not os.path.isfile(os.path.join(self.folder, "images.txt")):
            download_and_extract_archive(CUB_URL, self.data_dir, filename="CUB_200_2011.tgz", md5=CUB_MD5)

    def _read(self) -> tuple[list[str], ImageFiles, ImageFiles]:
        """``(classes, training split, test split)``, read once."""
        if self._splits is None:
            missing = [name for name in self.REQUIRED if not os.path.isfile(os.path.join(self.folder, name))]
            if missing or not os.path.isdir(os.path.join(self.folder, "images")):
                raise RuntimeError(
                    f"CUB-200-2011 not found or incomplete in {os.path.abspath(self.folder)} (missing: "
                    f"{', '.join(missing or ['images/'])}): expected CUB_200_2011/{{{', '.join(self.REQUIRED)}}} and "
                    f"CUB_200_2011/images/<class>/<image>.jpg. Pass download=True to download CUB_200_2011.tgz "
                    f"({CUB_URL}), or unpack it into {os.path.abspath(self.data_dir)}."
                )
            tables = {name: self._table(name) for name in self.REQUIRED}
            classes = [tables["classes.txt"][key] for key in sorted(tables["classes.txt"], key=int)]
            ids = sorted(tables["images.txt"], key=int)
            for name in ("image_class_labels.txt", "train_test_split.txt"):
                if set(tables[name]) != set(ids):
                    raise ValueError(
                        f"{os.path.join(self.folder, name)} and images.txt list different image ids "
                        f"({len(tables[name])} and {len(ids)} ids)"
                    )
            labels = [int(tables["image_class_labels.txt"][i]) - 1 for i in ids]
            bad = sorted({label + 1 for label in labels if not 0 <= label < len(classes)})
            if bad:
                raise ValueError(
                    f"{os.path.join(self.folder, 'image_class_labels.txt')} has class ids outside 1..{len(classes)} "
                    f"(classes.txt): {bad[:5]}"
                )
            files = ImageFiles(os.path.join(self.folder, "images"), [tables["images.txt"][i] for i in ids], labels)
            is_train = torch.tensor([tables["train_test_split.txt"][i] == "1" for i in ids])
            train, test = is_train.nonzero().flatten(), (~is_train).nonzero().flatten()
            self._splits = (classes, files.subset(train), files.subset(test))
        return self._splits

    def _table(self, name: str) -> dict[str, str]:
        """``{first field: rest of the line}`` of one of the ``.txt`` files."""
        path = os.path.join(self.folder, name)
        table: dict[str, str] = {}
        for number, line in enumerate(_read_lines(path), 1):
            key, sep, value = line.partition(" ")
            if not sep:
                raise ValueError(f"{path}, line {number}: expected '<id> <value>', got {line!r}")
            table[key] = value.strip()
        return table

    def _load_train_pool(self) -> tuple[Dataset, Tensor]:
        train = self._read()[1]
        return train, train.label_tensor()

    def _load_test_set(self) -> Dataset:
        return self._read()[2]
