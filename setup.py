"""Packaging for twisted-forward: the library and its twistd plugin."""

from setuptools import find_packages, setup

setup(
    name="twisted-forward",
    version="0.1.0",
    description="A streaming OpenAI API forwarding proxy built on Twisted.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    # twisted/plugins has no __init__.py on purpose: it is a portion of
    # Twisted's plugin package, found by twisted.plugin.getPlugins.
    packages=find_packages(include=["twisted_forward", "twisted_forward.*"]) + ["twisted.plugins"],
    # Files served or read from the packages: the admin page (HTML, JS,
    # CSS) and the price table.
    package_data={
        "twisted_forward.admin": ["static/*"],
        "twisted_forward.policies": ["prices.json"],
    },
    install_requires=[
        "twisted[tls]>=25.5.0",
        "treq>=23.11.0",
        "pyopenssl>=23.0.0",
        "service-identity>=21.1.0",
        "python-dotenv>=1.0.0",
        "prometheus-client>=0.17.0",
        # hyperlink comes with treq; named because upstream.py subclasses it.
        "hyperlink>=21.0.0",
        # The response cache's LMDB backend (CACHE_BACKEND=LMDB).
        "lmdb>=1.4.0,<4",
        # Redis/Valkey from Twisted, no threads: the policy counters and the
        # cache's REDIS backend (REDIS_URL).
        "txredisapi>=1.4.10,<2",
        # The usage ledger on PostgreSQL (DATABASE_URL): psycopg 3, its binary
        # wheel bundling libpq, so no system library or compiler is needed.
        "psycopg[binary]>=3.1,<4",
    ],
    entry_points={
        "console_scripts": ["twisted-forward = twisted_forward.cli:main"],
    },
    extras_require={
        # playwright drives Debian's chromium in the admin page's browser
        # test (it never downloads a browser of its own).
        # aiohttp is the bench's second fake upstream (the smoke run uses it).
        "test": ["openai>=1.0.0", "hypothesis>=6.0.0", "playwright>=1.40,<2",
                 "aiohttp>=3.9,<4"],
    },
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
    ],
)
