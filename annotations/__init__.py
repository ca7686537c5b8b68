"""labelme annotations -> DeepLab training data (numpy + Pillow + standard library only).

See docs/annotations.md.
"""

from .archive import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_FILES,
    ExtractionBudget,
    extracted_zips,
    safe_extract_zip,
    single_top_folder,
)
from .convert import (
    ConversionReport,
    ConvertedImage,
    LoadedDataset,
    convert_file,
    convert_folder,
    dataset_names,
    find_label_files,
    load_labelme_dataset,
)
from .errors import (
    AnnotationError,
    ImageLoadError,
    LabelmeFormatError,
    LabelSpaceError,
    MappingError,
    OutputExistsError,
    UnknownLabelError,
    UnsafeArchiveError,
)
from .label_spaces import (
    IGNORE_INDEX,
    LabelSpace,
    builtin_label_space,
    colorize,
    get_label_space,
    label_space_for_names,
    normalize_name,
    palette_image,
    voc_colormap,
)
from .limits import (
    MAX_IMAGE_PIXELS,
    ImageTooLargeError,
    ShapeWork,
    ShapeWorkError,
    check_pixels,
    image_size,
    open_image,
)
from .mapping import LabelMapping
from .rasterize import rasterize, shape_to_mask
from .reader import Issue, LabelmeFile, Shape, apply_exif_orientation, read_labelme, resolve_image_path

VOC = get_label_space("voc")
COCOSTUFF = get_label_space("cocostuff")

__all__ = [
    "AnnotationError", "COCOSTUFF", "ConversionReport", "ConvertedImage", "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_FILES", "ExtractionBudget", "IGNORE_INDEX", "ImageLoadError", "ImageTooLargeError",
    "MAX_IMAGE_PIXELS", "ShapeWork", "ShapeWorkError", "check_pixels", "extracted_zips", "image_size", "open_image", "resolve_image_path",
    "single_top_folder", "Issue", "LabelMapping", "LabelSpace",
    "LabelSpaceError", "LabelmeFile", "LabelmeFormatError", "LoadedDataset", "MappingError",
    "OutputExistsError", "Shape", "UnknownLabelError", "UnsafeArchiveError", "VOC",
    "apply_exif_orientation", "builtin_label_space", "colorize", "convert_file", "convert_folder",
    "dataset_names", "find_label_files", "get_label_space", "label_space_for_names",
    "load_labelme_dataset", "normalize_name", "palette_image", "rasterize", "read_labelme", "safe_extract_zip",
    "shape_to_mask", "voc_colormap",
]
