# Stand-in for prom/pushgateway: Debian's prometheus-pushgateway at the image's /bin/pushgateway,
# wget for the healthcheck (busybox provides it in the real image).
ARG BASE
FROM ${BASE}
RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        prometheus-pushgateway wget \
    && rm -rf /var/lib/apt/lists/* \
    && ln -s /usr/bin/prometheus-pushgateway /bin/pushgateway
EXPOSE 9091
USER nobody
ENTRYPOINT ["/bin/pushgateway"]
