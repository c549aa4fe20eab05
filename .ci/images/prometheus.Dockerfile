# Stand-in for prom/prometheus: Debian's prometheus and promtool, at /bin as in the real image
# (bookworm merges /bin into /usr/bin).
ARG BASE
FROM ${BASE}
RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        prometheus wget \
    && rm -rf /var/lib/apt/lists/* \
    && test -x /bin/prometheus -a -x /bin/promtool \
    && mkdir -p /prometheus && chown nobody /prometheus
EXPOSE 9090
USER nobody
ENTRYPOINT ["/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
