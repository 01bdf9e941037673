"""kryptvault: an encrypted virtual disk that exists only while its owner's USB key is plugged in."""

__version__ = "0.1.0"
