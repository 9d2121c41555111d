"""Converters that turn image datasets into class-grouped WebDataset tar shards plus index.json.

- shards.digits      scikit-learn's 8x8 digits (ships offline; tests and the demo)
- shards.imagenet_r  ImageNet-R (official 200-folder archive or pre-split train/ test/)
- shards.cifar100    CIFAR-100 python pickles (train, test, meta)
- shards.imagefolder any ImageFolder-style tree
Common tar/index writing lives in shards.writer; the reader is sdlora_ds.data.
"""
