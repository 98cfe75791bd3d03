"""cxlfork: checkpoint a running process into a page store on the CXL tier and restore copy-on-write clones."""
