# slurm_mm: build and install everything a compute node or login node needs.
#   make                 build the SPANK plugin and the native helpers
#   make install         install under $(PREFIX) (+ links in $(BINDIR), systemd unit,
#                        tmpfiles.d), honouring DESTDIR; needs the venv (make venv) first
#   make venv            create/refresh $(PREFIX)/venv with slurm_mm installed
# contrib/install-deps.sh runs `make venv install` after installing Slurm and CRIU;
# debian/build-deb.sh runs the same targets into a staging tree for the .deb.
PREFIX ?= /opt/slurm_mm
BINDIR ?= /usr/local/bin
SYSTEMDDIR ?= /etc/systemd/system
TMPFILESDIR ?= /etc/tmpfiles.d
PYTHON ?= /usr/bin/python3
VENV = $(DESTDIR)$(PREFIX)/venv
SHARE = $(DESTDIR)$(PREFIX)/share

all:
	$(MAKE) -C spank
	$(MAKE) -C slurm_mm/native

venv:
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --no-warn-script-location --force-reinstall --no-deps .
	$(VENV)/bin/pip install -q --no-warn-script-location .

install: all
	test -x $(VENV)/bin/slurm-mm || { echo "make install: run 'make venv' first" >&2; exit 1; }
	$(MAKE) -C spank install PREFIX=$(PREFIX) DESTDIR=$(DESTDIR)
	$(MAKE) -C slurm_mm/native install PREFIX=$(PREFIX) DESTDIR=$(DESTDIR)
	install -d -m 0755 $(DESTDIR)$(PREFIX)/prolog_epilog $(SHARE)/slurm
	for hook in prolog epilog; do \
	  sed '1s|^#!.*|#!$(PREFIX)/venv/bin/python -I|' prolog_epilog/$$hook > $(DESTDIR)$(PREFIX)/prolog_epilog/$$hook.tmp && \
	  chmod 0755 $(DESTDIR)$(PREFIX)/prolog_epilog/$$hook.tmp && \
	  mv -f $(DESTDIR)$(PREFIX)/prolog_epilog/$$hook.tmp $(DESTDIR)$(PREFIX)/prolog_epilog/$$hook; done
	install -m 0644 contrib/slurm/plugstack.conf contrib/slurm/slurm.conf.snippet \
	  contrib/slurm/cli_filter.lua contrib/slurm/config.yaml $(SHARE)/slurm/
	install -D -m 0644 contrib/slurm/slurm-mm-agent.service $(DESTDIR)$(SYSTEMDDIR)/slurm-mm-agent.service
	install -D -m 0644 contrib/slurm/tmpfiles.conf $(DESTDIR)$(TMPFILESDIR)/slurm_mm.conf
	install -d -m 0755 $(DESTDIR)$(BINDIR)
	ln -sfn $(PREFIX)/venv/bin/slurm-mm $(DESTDIR)$(BINDIR)/slurm-mm
	ln -sfn $(PREFIX)/venv/bin/slurm-mm-run $(DESTDIR)$(BINDIR)/slurm-mm-run

clean:
	$(MAKE) -C spank clean
	$(MAKE) -C slurm_mm/native clean

.PHONY: all venv install clean
