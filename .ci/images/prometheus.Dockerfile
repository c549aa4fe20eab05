# Stand-in for prom/prometheus: Debian's prometheus and promtool at the image's /bin paths.
ARG BASE
FROM ${BASE}
RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        prometheus wget \
    && rm -rf /var/lib/apt/lists/* \
    && ln -s /usr/bin/prometheus /bin/prometheus && ln -s /usr/bin/promtool /bin/promtool \
    && mkdir -p /prometheus && chown nobody /prometheus
EXPOSE 9090
USER nobody
ENTRYPOINT ["/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
