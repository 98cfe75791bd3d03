"""cxlfork: checkpoint a running process into a page store on the CXL tier and restore
copy-on-write clones of it.

Two pipelines, each a module: `checkpoint` (freeze with ptrace -> collect -> write present pages
into the store -> publish a versioned manifest) and `restore` (spawn the static restorer ->
rebuild the address space from the store -> registers and the rest -> run).
"""

FORMAT = "cxlfork-image"
FORMAT_VERSION = 3
