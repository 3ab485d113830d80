/*
 * onenet-agent: a OneNET OTA agent for an nRF52832 product, built for Linux so that it can be
 * tested as a board before boards exist (hil's host-build rig kind: `console: {command: [...]}`).
 *
 * It behaves as shipped firmware: no shell, its console a read-only log (stdout), one OTA
 * attempt when it starts, installs into its state directory (its flash) and restarts into the
 * new version. See README.md beside this file for the settings, the state files and the
 * defects that can be compiled in (-DDEFECT_...).
 *
 * The attempt mirrors hil's simulated firmware (hil/sim/firmware.py) step by step:
 *   1. POST /ota/device/version {"s_version": V}
 *   2. detect (type=2, manuf=102, model=10201; no power/signal: the agent has no battery gauge
 *      and no radio, so the task's thresholds do not apply to it)
 *   3. free package storage (102 above the slot size)
 *   4. token check: 12/20/22 end the attempt without a report, any other error 107
 *   5. ranged download in 4 KiB chunks into secondary.bin, every answer checked, the offset
 *      persisted after every chunk; error bodies 1/2/3/5 are final (107); 4/6, timeouts and bad
 *      answers are retried up to the task's `retry`, `interval` s apart, then 104 (timeout), 103
 *      (a 206 longer than the range asked: more than its 4 KiB buffer) or 107
 *   6. 101, then the md5 (205 on a mismatch), then the image's header (203 when it says the
 *      image is larger than the slot)
 *   7. install: "install pending" recorded, secondary.bin renamed over primary.bin, exit 0 (the
 *      board reboots: hil restarts it) or execv itself (HIL_AGENT_REBOOT=exec)
 *   8. at the next start, 201 if the image booted is the target, else 204; then `ota end`, and
 *      the check every start makes (steps 1..7: its version report tells what now runs).
 */
#define _POSIX_C_SOURCE 200809L
#define _DEFAULT_SOURCE

#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#include <openssl/evp.h>
#include <openssl/hmac.h>

/* The board this agent is built for (ONENET.md's chip table) and its MCUboot slot. */
#define MANUF "102"
#define MODEL "10201"
#define TASK_TYPE_SOTA 2
#define SLOT_SIZE 0x32000L             /* nRF52832 (Zephyr nrf52dk layout): 200 KiB per slot */
#define CHUNK_SIZE 4096L
#define TOKEN_LIFETIME_S 3600L
#define DEFAULT_HTTP_TIMEOUT_S 5
#define RETRY_FLOOR_MS 50              /* a "retries forever" build still does not spin */
#define DEFAULT_FLASH_PAGE_MS 64       /* nRF52832 NVMC: 85 ms page erase + 1024 x 41 us word
                                        * writes per 4 KiB, halved as hil's simulated boards do */

/* Result codes (ONENET.md) and the errnos the agent acts on. */
enum {
    R_DOWNLOADED = 101, R_NO_SPACE = 102, R_OVERFLOW = 103, R_TIMEOUT = 104, R_UNKNOWN = 107,
    R_UPGRADED = 201, R_UPGRADE_OVERFLOW = 203, R_VERSION_MISMATCH = 204, R_MD5_MISMATCH = 205,
};
enum { E_OK = 0, E_TOKEN_EXPIRED = 12, E_TASK_FINISHED = 20, E_INVALID_OPERATION = 21,
       E_TASK_CANCELLED = 22, E_NONE = -1 /* no answer, or not JSON */ };

#define PRIMARY "primary.bin"
#define SECONDARY "secondary.bin"
#define STATE "ota.state"

/* ================================================================================ settings */
static struct {
    char host[256];
    char port[16];
    char base_path[256];               /* HIL_OTA_URL's path, if any ("" or "/prefix") */
    char product_id[64];
    char dev_id[64];
    unsigned char key[128];
    int key_len;
    char state_dir[1024];
    int http_timeout_s;
    int check_period_s;                /* 0: one attempt per boot */
    int reboot_exec;                   /* HIL_AGENT_REBOOT=exec: execv itself instead of exiting */
    long flash_page_ms;                /* how long the install takes per 4 KiB page */
    char *const *argv;
} cfg;

static void say(const char *format, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *format, ...)
{
    va_list args;
    va_start(args, format);
    vprintf(format, args);
    va_end(args);
    putchar('\n');
    fflush(stdout);
}

static void on_term(int sig)
{
    (void)sig;
    static const char line[] = "I: agent: SIGTERM, stopping\n";
    ssize_t ignored = write(STDOUT_FILENO, line, sizeof line - 1);
    (void)ignored;
    _exit(0);   /* every state file is replaced atomically: stopping anywhere is safe */
}

static void sleep_ms(long ms)
{
    struct timespec left = { ms / 1000, (ms % 1000) * 1000000L };
    while (nanosleep(&left, &left) != 0 && errno == EINTR) {
    }
}

static void path_of(char *out, size_t size, const char *name)
{
    snprintf(out, size, "%s/%s", cfg.state_dir, name);
}

/* ================================================================================ crypto */
static int base64_decode(const char *text, unsigned char *out, int capacity)
{
    size_t len = strlen(text);
    if (len == 0 || len % 4 != 0 || (int)(len / 4 * 3) > capacity)
        return -1;
    int n = EVP_DecodeBlock(out, (const unsigned char *)text, (int)len);
    if (n < 0)
        return -1;
    if (text[len - 1] == '=')
        n--;
    if (text[len - 2] == '=')
        n--;
    return n;
}

static void hex_of(const unsigned char *digest, unsigned len, char *out)
{
    for (unsigned i = 0; i < len; i++)
        sprintf(out + 2 * i, "%02x", digest[i]);
}

/* The md5 (hex) or sha256 of a file's first `size` bytes (-1: all); 0 on success. */
static int file_digest(const char *path, long size, const EVP_MD *md, unsigned char *digest,
                       unsigned *digest_len)
{
    FILE *file = fopen(path, "rb");
    if (!file)
        return -1;
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    EVP_DigestInit_ex(ctx, md, NULL);
    unsigned char buffer[8192];
    long left = size;
    size_t n;
    while ((left < 0 || left > 0) &&
           (n = fread(buffer, 1, left < 0 || left > (long)sizeof buffer ? sizeof buffer
                                                                         : (size_t)left, file)) > 0) {
        EVP_DigestUpdate(ctx, buffer, n);
        if (left > 0)
            left -= (long)n;
    }
    int bad = ferror(file) || left > 0;
    fclose(file);
    EVP_DigestFinal_ex(ctx, digest, digest_len);
    EVP_MD_CTX_free(ctx);
    return bad ? -1 : 0;
}

static int file_md5_hex(const char *path, long size, char out[33])
{
    unsigned char digest[EVP_MAX_MD_SIZE];
    unsigned len;
    if (file_digest(path, size, EVP_md5(), digest, &len) != 0)
        return -1;
    hex_of(digest, len, out);
    return 0;
}

/* OneNET's Authorization value (hil/onenet/auth.py): product-level key, sha1, URL-encoded. */
static void url_encode(const char *in, char *out, size_t size)
{
    size_t o = 0;
    for (; *in && o + 4 < size; in++) {
        unsigned char c = (unsigned char)*in;
        if ((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
            c == '-' || c == '_' || c == '.' || c == '~')
            out[o++] = (char)c;
        else
            o += (size_t)sprintf(out + o, "%%%02X", c);
    }
    out[o] = '\0';
}

static void authorization(char *out, size_t size)
{
    long et = (long)time(NULL) + TOKEN_LIFETIME_S;
    char res[128], message[256];
    snprintf(res, sizeof res, "products/%s", cfg.product_id);
    snprintf(message, sizeof message, "%ld\nsha1\n%s\n2018-10-31", et, res);
    unsigned char mac[EVP_MAX_MD_SIZE];
    unsigned mac_len = 0;
    HMAC(EVP_sha1(), cfg.key, cfg.key_len, (const unsigned char *)message, strlen(message), mac,
         &mac_len);
    char sign[64], sign_enc[128], res_enc[256];
    EVP_EncodeBlock((unsigned char *)sign, mac, (int)mac_len);
    url_encode(sign, sign_enc, sizeof sign_enc);
    url_encode(res, res_enc, sizeof res_enc);
    snprintf(out, size, "version=2018-10-31&res=%s&et=%ld&method=sha1&sign=%s", res_enc, et,
             sign_enc);
}

/* ================================================================================ images */
/* An MCUboot image checked as the bootloader does (hil/sim/images.py): header magic, TLV area,
 * SHA256 TLV over header + payload (+ protected TLVs). Writes its version; 0 when valid. */
static uint32_t le32(const unsigned char *p) { return p[0] | p[1] << 8 | p[2] << 16 | (uint32_t)p[3] << 24; }
static uint16_t le16(const unsigned char *p) { return (uint16_t)(p[0] | p[1] << 8); }

static int image_version(const char *path, char *version, size_t size, char *why, size_t why_size)
{
    FILE *file = fopen(path, "rb");
    if (!file) {
        snprintf(why, why_size, "cannot open %s: %s", path, strerror(errno));
        return -1;
    }
    static unsigned char data[SLOT_SIZE + 1];
    size_t len = fread(data, 1, sizeof data, file);
    fclose(file);
    if (len > SLOT_SIZE) {
        snprintf(why, why_size, "image larger than the %#lx-byte slot", SLOT_SIZE);
        return -1;
    }
    if (len < 32) {
        snprintf(why, why_size, "not an MCUboot image: %zu bytes, shorter than the header", len);
        return -1;
    }
    uint32_t magic = le32(data);
    if (magic != 0x96f3b83dU) {
        snprintf(why, why_size, "not an MCUboot image: magic %#010x, expected 0x96f3b83d", magic);
        return -1;
    }
    size_t offset = (size_t)le16(data + 8) + le32(data + 12);
    size_t hashed_end = offset;
    if (len >= offset + 4 && le16(data + offset) == 0x6908) {   /* protected TLVs */
        offset += le16(data + offset + 2);
        hashed_end = offset;
    }
    if (len < offset + 4 || le16(data + offset) != 0x6907) {
        snprintf(why, why_size, "MCUboot image has no TLV area at %#zx", offset);
        return -1;
    }
    size_t end = offset + le16(data + offset + 2);
    if (len < end) {
        snprintf(why, why_size, "MCUboot image truncated: its TLVs end at %#zx", end);
        return -1;
    }
    for (offset += 4; offset + 4 <= end; offset += 4 + le16(data + offset + 2)) {
        if ((data[offset] & 0xFF) != 0x10)   /* IMAGE_TLV_SHA256 */
            continue;
        unsigned char digest[EVP_MAX_MD_SIZE];
        unsigned digest_len;
        EVP_Digest(data, hashed_end, digest, &digest_len, EVP_sha256(), NULL);
        if (le16(data + offset + 2) != 32 || offset + 4 + 32 > end ||
            memcmp(digest, data + offset + 4, 32) != 0) {
            snprintf(why, why_size, "MCUboot image SHA256 does not match its contents");
            return -1;
        }
        uint32_t build = le32(data + 24);
        if (build)
            snprintf(version, size, "%u.%u.%u+%u", data[20], data[21], le16(data + 22), build);
        else
            snprintf(version, size, "%u.%u.%u", data[20], data[21], le16(data + 22));
        return 0;
    }
    snprintf(why, why_size, "MCUboot image has no SHA256 TLV");
    return -1;
}

#ifndef DEFECT_INSTALLS_OVERSIZED
/* How many bytes an MCUboot image's header says it fills (ih_hdr_size + ih_img_size, what
 * MCUboot's boot_check_header_valid compares with the slot); -1 when it is no MCUboot header. */
static long image_span(const char *path)
{
    unsigned char header[16];
    FILE *file = fopen(path, "rb");
    if (!file)
        return -1;
    size_t len = fread(header, 1, sizeof header, file);
    fclose(file);
    if (len < sizeof header || le32(header) != 0x96f3b83dU)
        return -1;
    return (long)le16(header + 8) + (long)le32(header + 12);
}
#endif

/* ================================================================================ state */
/* The attempt in progress (the settings partition), a few `key=value` lines in ota.state,
 * replaced atomically (temp file, fsync, rename, fsync of the directory) after every change, so
 * a power cut at any moment leaves either the old or the new state. */
struct ota_state {
    int present;
    char stage[16];                    /* download | downloaded | install */
    char token[128];
    char target[32];
    long size;
    char md5[40];
    char running[40];                  /* md5 of primary.bin when the attempt started */
    char image[40];                    /* md5 of what secondary.bin held when it was installed */
    long offset;
    int reported_101;
    int reported;                      /* the post-boot result is reported already */
    int copied;                        /* the install's copy into primary.bin is complete */
};

static void sync_dir(void)
{
    int fd = open(cfg.state_dir, O_RDONLY | O_DIRECTORY);
    if (fd >= 0) {
        fsync(fd);
        close(fd);
    }
}

static void state_load(struct ota_state *s)
{
    memset(s, 0, sizeof *s);
    char path[1200], line[512];
    path_of(path, sizeof path, STATE);
    FILE *file = fopen(path, "r");
    if (!file)
        return;
    while (fgets(line, sizeof line, file)) {
        line[strcspn(line, "\r\n")] = '\0';
        char *value = strchr(line, '=');
        if (!value)
            continue;
        *value++ = '\0';
        if (!strcmp(line, "stage"))
            snprintf(s->stage, sizeof s->stage, "%s", value);
        else if (!strcmp(line, "token"))
            snprintf(s->token, sizeof s->token, "%s", value);
        else if (!strcmp(line, "target"))
            snprintf(s->target, sizeof s->target, "%s", value);
        else if (!strcmp(line, "md5"))
            snprintf(s->md5, sizeof s->md5, "%s", value);
        else if (!strcmp(line, "running"))
            snprintf(s->running, sizeof s->running, "%s", value);
        else if (!strcmp(line, "image"))
            snprintf(s->image, sizeof s->image, "%s", value);
        else if (!strcmp(line, "reported"))
            s->reported = atoi(value);
        else if (!strcmp(line, "size"))
            s->size = atol(value);
        else if (!strcmp(line, "offset"))
            s->offset = atol(value);
        else if (!strcmp(line, "reported_101"))
            s->reported_101 = atoi(value);
        else if (!strcmp(line, "copied"))
            s->copied = atoi(value);
    }
    fclose(file);
    s->present = s->stage[0] && s->token[0];
}

static void state_save(const struct ota_state *s)
{
    char path[1200], temporary[1200];
    path_of(path, sizeof path, STATE);
    path_of(temporary, sizeof temporary, STATE ".tmp");
    FILE *file = fopen(temporary, "w");
    if (!file) {
        say("E: cannot write %s: %s", temporary, strerror(errno));
        return;
    }
    fprintf(file, "stage=%s\ntoken=%s\ntarget=%s\nsize=%ld\nmd5=%s\nrunning=%s\nimage=%s\n"
            "offset=%ld\nreported_101=%d\nreported=%d\ncopied=%d\n", s->stage, s->token, s->target,
            s->size, s->md5, s->running, s->image, s->offset, s->reported_101, s->reported,
            s->copied);
    fflush(file);
    fsync(fileno(file));
    fclose(file);
    if (rename(temporary, path) != 0)
        say("E: cannot replace %s: %s", path, strerror(errno));
    sync_dir();
}

static void state_clear(void)
{
    char path[1200];
    path_of(path, sizeof path, STATE);
    unlink(path);
    sync_dir();
}

/* ================================================================================ HTTP */
enum http_outcome { HTTP_ANSWERED, HTTP_TIMEOUT, HTTP_CONNECTION };

struct http_answer {
    int status;
    long content_length;               /* -1: no Content-Length header */
    char content_range[128];
    unsigned char *body;
    size_t body_len;
};

static void http_free(struct http_answer *a)
{
    free(a->body);
    a->body = NULL;
}

static int header_value(const char *headers, const char *name, char *out, size_t size)
{
    size_t name_len = strlen(name);
    for (const char *line = headers; line && *line; ) {
        const char *end = strstr(line, "\r\n");
        if (!end)
            end = line + strlen(line);
        if ((size_t)(end - line) > name_len && !strncasecmp(line, name, name_len) &&
            line[name_len] == ':') {
            const char *value = line + name_len + 1;
            while (*value == ' ' || *value == '\t')
                value++;
            size_t len = (size_t)(end - value);
            while (len && (value[len - 1] == ' ' || value[len - 1] == '\t'))
                len--;
            if (len >= size)
                len = size - 1;
            memcpy(out, value, len);
            out[len] = '\0';
            return 1;
        }
        line = *end ? end + 2 : end;
    }
    return 0;
}

/* One request on a new TCP connection (Connection: close, as the vendor client does). */
static enum http_outcome http_request(const char *method, const char *path, const char *range,
                                      const char *json, struct http_answer *answer)
{
    memset(answer, 0, sizeof *answer);
    answer->content_length = -1;
    struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM }, *found;
    int rc = getaddrinfo(cfg.host, cfg.port, &hints, &found);
    if (rc != 0) {
        say("W: http: cannot resolve %s: %s", cfg.host, gai_strerror(rc));
        return HTTP_CONNECTION;
    }
    struct timeval timeout = { cfg.http_timeout_s, 0 };
    int fd = -1, timed_out = 0;
    for (struct addrinfo *ai = found; ai; ai = ai->ai_next) {
        fd = socket(ai->ai_family, ai->ai_socktype, ai->ai_protocol);
        if (fd < 0)
            continue;
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof timeout);  /* bounds connect too */
        if (connect(fd, ai->ai_addr, ai->ai_addrlen) == 0)
            break;
        timed_out = errno == EINPROGRESS || errno == EAGAIN || errno == ETIMEDOUT;
        close(fd);
        fd = -1;
    }
    freeaddrinfo(found);
    if (fd < 0)
        return timed_out ? HTTP_TIMEOUT : HTTP_CONNECTION;

    char auth[512], request[2048];
    authorization(auth, sizeof auth);
    int n = snprintf(request, sizeof request,
                     "%s %s%s HTTP/1.1\r\nHost: %s%s%s\r\nAuthorization: %s\r\n"
                     "Connection: close\r\n", method, cfg.base_path, path, cfg.host,
                     strcmp(cfg.port, "80") ? ":" : "", strcmp(cfg.port, "80") ? cfg.port : "",
                     auth);
    if (range)
        n += snprintf(request + n, sizeof request - (size_t)n, "Range: %s\r\n", range);
    if (json)
        n += snprintf(request + n, sizeof request - (size_t)n,
                      "Content-Type: application/json\r\nContent-Length: %zu\r\n\r\n%s",
                      strlen(json), json);
    else
        n += snprintf(request + n, sizeof request - (size_t)n, "\r\n");
    for (int sent = 0; sent < n; ) {
        ssize_t w = send(fd, request + sent, (size_t)(n - sent), MSG_NOSIGNAL);
        if (w <= 0) {
            int was_timeout = w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK);
            close(fd);
            return was_timeout ? HTTP_TIMEOUT : HTTP_CONNECTION;
        }
        sent += (int)w;
    }

    /* Read until the server closes, or the body is as long as Content-Length says. */
    size_t cap = 16384, len = 0;
    unsigned char *buf = malloc(cap + 1);
    long header_end = -1;
    enum http_outcome outcome = HTTP_ANSWERED;
    for (;;) {
        if (header_end >= 0 && answer->content_length >= 0 &&
            len >= (size_t)header_end + (size_t)answer->content_length)
            break;
        if (len == cap) {
            cap *= 2;
            buf = realloc(buf, cap + 1);
        }
        ssize_t r = recv(fd, buf + len, cap - len, 0);
        if (r == 0)
            break;
        if (r < 0) {
            if (errno == EINTR)
                continue;
            outcome = errno == EAGAIN || errno == EWOULDBLOCK ? HTTP_TIMEOUT : HTTP_CONNECTION;
            break;
        }
        len += (size_t)r;
        buf[len] = '\0';
        if (header_end < 0) {
            char *end = strstr((char *)buf, "\r\n\r\n");
            if (end) {
                header_end = end - (char *)buf + 4;
                char value[64];
                end[2] = '\0';     /* the header block, as a string, for header_value */
                const char *headers = strstr((char *)buf, "\r\n");
                if (headers && header_value(headers + 2, "Content-Length", value, sizeof value))
                    answer->content_length = atol(value);
                if (headers)
                    header_value(headers + 2, "Content-Range", answer->content_range,
                                 sizeof answer->content_range);
                if (sscanf((char *)buf, "HTTP/1.%*d %d", &answer->status) != 1)
                    answer->status = 0;
                end[2] = '\r';
            }
        }
    }
    close(fd);
    if (outcome != HTTP_ANSWERED || header_end < 0 || answer->status == 0) {
        free(buf);
        return outcome != HTTP_ANSWERED ? outcome : HTTP_CONNECTION;
    }
    answer->body_len = len - (size_t)header_end;
    if (answer->content_length >= 0 && answer->body_len > (size_t)answer->content_length)
        answer->body_len = (size_t)answer->content_length;
    answer->body = malloc(answer->body_len + 1);
    memcpy(answer->body, buf + header_end, answer->body_len);
    answer->body[answer->body_len] = '\0';
    free(buf);
    return HTTP_ANSWERED;
}

/* A flat JSON answer's member, found by name ({"errno":0,"error":"..","data":{..}}). */
static const char *json_member(const char *json, const char *name)
{
    char quoted[64];
    snprintf(quoted, sizeof quoted, "\"%s\"", name);
    for (const char *at = strstr(json, quoted); at; at = strstr(at + 1, quoted)) {
        const char *p = at + strlen(quoted);
        while (*p == ' ' || *p == '\t' || *p == '\r' || *p == '\n')
            p++;
        if (*p != ':')
            continue;
        for (p++; *p == ' ' || *p == '\t' || *p == '\r' || *p == '\n'; p++) {
        }
        return p;
    }
    return NULL;
}

static int json_int(const char *json, const char *name, long *out)
{
    const char *p = json_member(json, name);
    char *end;
    if (!p || !(*p == '-' || (*p >= '0' && *p <= '9')))
        return 0;
    *out = strtol(p, &end, 10);
    return end != p;
}

static int json_str(const char *json, const char *name, char *out, size_t size)
{
    const char *p = json_member(json, name);
    if (!p || *p != '"')
        return 0;
    const char *end = strchr(p + 1, '"');
    if (!end || (size_t)(end - p - 1) >= size)
        return 0;
    memcpy(out, p + 1, (size_t)(end - p - 1));
    out[end - p - 1] = '\0';
    return 1;
}

/* A JSON call: its errno, or E_NONE when it got no JSON answer. `body_out` keeps the body. */
static long json_call(const char *method, const char *path, const char *json, char **body_out)
{
    struct http_answer answer;
    long errno_value = E_NONE;
    if (http_request(method, path, NULL, json, &answer) == HTTP_ANSWERED) {
        if (!json_int((char *)answer.body, "errno", &errno_value))
            errno_value = E_NONE;
        if (body_out) {
            *body_out = (char *)answer.body;
            answer.body = NULL;
        }
    }
    http_free(&answer);
    return errno_value;
}

/* ================================================================================ OTA */
struct task {
    char target[32];
    char token[128];
    long size;
    char md5[40];
    long retry;
    long interval;
};

static long report(const char *token, int result)
{
    char path[512], body[32];
    snprintf(path, sizeof path, "/ota/south/report?dev_id=%s&token=%s", cfg.dev_id, token);
    snprintf(body, sizeof body, "{\"result\":%d}", result);
    long errno_value = json_call("POST", path, body, NULL);
    if (errno_value == E_NONE)
        say("ota phase=report result=%d errno=None", result);
    else
        say("ota phase=report result=%d errno=%ld", result, errno_value);
    return errno_value;
}

/* Detect: 1 with the task filled in, 0 when there is none to run (the log says why). */
static int detect(const char *version, struct task *task)
{
    char path[512], *body = NULL;
    snprintf(path, sizeof path, "/ota/south/check?dev_id=%s&manuf=" MANUF "&model=" MODEL
             "&type=%d&version=%s&cdn=true", cfg.dev_id, TASK_TYPE_SOTA, version);
    long errno_value = json_call("GET", path, NULL, &body);
    if (errno_value != E_OK) {
        if (errno_value == E_NONE)
            say("ota phase=detect errno=None");
        else
            say("ota phase=detect errno=%ld", errno_value);
        free(body);
        return 0;
    }
    const char *data = json_member(body, "data");
    memset(task, 0, sizeof *task);
    int ok = data && json_str(data, "target", task->target, sizeof task->target) &&
             json_str(data, "token", task->token, sizeof task->token) &&
             json_int(data, "size", &task->size) && json_str(data, "md5", task->md5,
                                                             sizeof task->md5) &&
             json_int(data, "retry", &task->retry) && json_int(data, "interval", &task->interval);
    free(body);
    if (!ok || task->size <= 0) {
        say("ota phase=detect errno=0 error='the detect answer makes no sense'");
        return 0;
    }
    say("ota phase=detect errno=0 target=%s size=%ld", task->target, task->size);
    return 1;
}

/* How run_task ends when it reports nothing itself: a result code (> 0) is reported by the
 * caller; END_NO_REPORT forgets the attempt silently; END_KEEP keeps it for the next one. */
#define END_NO_REPORT 0
#define END_KEEP (-2)
#define GO_ON (-1)

/* Token check: GO_ON, or how the attempt ends. */
static int token_check(const struct task *task)
{
    char path[512];
    snprintf(path, sizeof path, "/ota/south/download/%s/check?dev_id=%s", task->token,
             cfg.dev_id);
    long errno_value = json_call("GET", path, NULL, NULL);
    if (errno_value == E_NONE)
        say("ota phase=token errno=None");
    else
        say("ota phase=token errno=%ld", errno_value);
    if (errno_value == E_OK)
        return GO_ON;
#ifndef DEFECT_REPORTS_AFTER_TOKEN_END
    if (errno_value == E_TOKEN_EXPIRED || errno_value == E_TASK_FINISHED ||
        errno_value == E_TASK_CANCELLED)
        return END_NO_REPORT;
#endif
    return R_UNKNOWN;
}

/* One chunk into secondary.bin at `start`. Returns the bytes written (> 0), or 0 with `cause`
 * set: 't' timeout, 'c' connection, 'a' a wrong answer, 'o' an answer longer than the range
 * asked (an overflow of the chunk's buffer), or the error body's code 1..6. */
static long fetch_chunk(const struct task *task, int fd, long start, long end, int *cause)
{
    char path[512], range[64];
    snprintf(path, sizeof path, "/ota/south/download/%s", task->token);
    snprintf(range, sizeof range, "bytes=%ld-%ld", start, end);
    struct http_answer answer;
    enum http_outcome outcome = http_request("GET", path, range, NULL, &answer);
    if (outcome != HTTP_ANSWERED) {
        *cause = outcome == HTTP_TIMEOUT ? 't' : 'c';
        say("ota phase=download offset=%ld error=%s", start,
            outcome == HTTP_TIMEOUT ? "timeout" : "connection");
        return 0;
    }
    say("ota phase=download offset=%ld status=%d", start, answer.status);
    long got = 0;
    *cause = 'a';
    if (answer.content_length < 0 && answer.body_len == 1) {
        /* OneNET's one-byte error answer: the byte's value (0x01..0x06), or its ASCII digit. */
        int code = answer.body[0] >= '1' && answer.body[0] <= '6' ? answer.body[0] - '0'
                                                                   : answer.body[0];
        if (code >= 1 && code <= 6)
            *cause = code;
        say("ota phase=download offset=%ld error-byte=%d", start, code);
        http_free(&answer);
        return 0;
    }
#ifdef DEFECT_TRUSTS_ANY_2XX
    if (answer.status >= 200 && answer.status < 300 && answer.body_len > 0) {
        got = (long)answer.body_len;
        goto write_chunk;
    }
#endif
#ifndef DEFECT_107_ON_OVERFLOW
    if (answer.status == 206 && answer.content_length > end - start + 1) {
        say("ota phase=download offset=%ld error=overflow length=%ld", start,
            answer.content_length);
        *cause = 'o';
        http_free(&answer);
        return 0;
    }
#endif
    char expected[128];
    snprintf(expected, sizeof expected, "bytes %ld-%ld/%ld", start, end, task->size);
    if (answer.status != 206 || answer.content_length < 0 ||
        strcmp(answer.content_range, expected) != 0 ||
        answer.body_len != (size_t)(end - start + 1)) {
        http_free(&answer);
        return 0;
    }
    got = (long)answer.body_len;
#ifdef DEFECT_TRUSTS_ANY_2XX
write_chunk:
#endif
    if (pwrite(fd, answer.body, (size_t)got, start) != got || fsync(fd) != 0) {
        say("E: cannot write " SECONDARY ": %s", strerror(errno));
        *cause = 'c';
        got = 0;
    }
    http_free(&answer);
    return got;
}

/* Step 5. 0 when the package is whole, else the result code to report. */
static int download(const struct task *task, struct ota_state *s)
{
    char path[1200];
    path_of(path, sizeof path, SECONDARY);
    int fd = open(path, O_RDWR | O_CREAT | (s->offset == 0 ? O_TRUNC : 0), 0644);
    if (fd < 0) {
        say("E: cannot open %s: %s", path, strerror(errno));
        return R_UNKNOWN;
    }
    long failures = 0;
    int early_reported = 0;
    (void)early_reported;
    while (s->offset < task->size) {
        long start = s->offset;
        long end = (start + CHUNK_SIZE < task->size ? start + CHUNK_SIZE : task->size) - 1;
        int cause = 0;
        long got = fetch_chunk(task, fd, start, end, &cause);
        if (got == 0) {
            if (cause == 1 || cause == 2 || cause == 3 || cause == 5) {
                close(fd);
                return R_UNKNOWN;
            }
            failures++;
#ifndef DEFECT_RETRIES_FOREVER
            if (failures > task->retry) {
                close(fd);
                return cause == 't' ? R_TIMEOUT : cause == 'o' ? R_OVERFLOW : R_UNKNOWN;
            }
#endif
            sleep_ms(task->interval * 1000 > RETRY_FLOOR_MS ? task->interval * 1000
                                                              : RETRY_FLOOR_MS);
            continue;
        }
        failures = 0;                     /* `retry` counts the retries of one range */
        s->offset = start + got;
        state_save(s);
#ifdef DEFECT_EARLY_101
        if (!early_reported) {
            early_reported = 1;
            report(task->token, R_DOWNLOADED);
        }
#endif
    }
    close(fd);
    return 0;
}

/* Copy secondary.bin over primary.bin if an install is pending and its copy is not complete
 * (what MCUboot's overwrite-only upgrade does at boot; also called right before the reboot).
 * The copy goes page by page, each written and fsync'd, taking the time the nRF52832's NVMC
 * takes to erase and program a page (HIL_FLASH_PAGE_MS): a power cut in the middle leaves half
 * an image in primary.bin, and the next start copies the intact secondary.bin again from the
 * start, announcing it again (`ota phase=flash bytes=N`), as MCUboot resumes from its trailer. */
static void bootloader(void)
{
    struct ota_state s;
    state_load(&s);
    if (!s.present || strcmp(s.stage, "install") != 0 || s.copied)
        return;
    char primary[1200], secondary[1200], version[32], why[160];
    path_of(primary, sizeof primary, PRIMARY);
    path_of(secondary, sizeof secondary, SECONDARY);
    if (access(secondary, F_OK) != 0)
        return;
    if (image_version(secondary, version, sizeof version, why, sizeof why) != 0) {
        say("E: bootloader: " SECONDARY " rejected: %s", why);
        return;
    }
    struct stat st;
    int from = open(secondary, O_RDONLY), to = -1;
    if (from >= 0 && fstat(from, &st) == 0)
        to = open(primary, O_WRONLY | O_CREAT | O_TRUNC, 0644);   /* the slot erased */
    if (from < 0 || to < 0) {
        say("E: bootloader: cannot install: %s", strerror(errno));
        if (from >= 0)
            close(from);
        return;
    }
    say("ota phase=flash bytes=%ld", (long)st.st_size);   /* the write starts now */
    say("I: bootloader: installing " SECONDARY " (%s) as " PRIMARY, version);
    static unsigned char page[CHUNK_SIZE];
    long done = 0;
    ssize_t n;
    while ((n = read(from, page, sizeof page)) > 0) {
        sleep_ms(cfg.flash_page_ms);       /* the page's erase and program */
        if (write(to, page, (size_t)n) != n || fsync(to) != 0) {
            say("E: bootloader: cannot write " PRIMARY ": %s", strerror(errno));
            break;
        }
        done += n;
        if (done == st.st_size || done % (4 * CHUNK_SIZE) == 0)
            say("I: bootloader: copied %ld of %ld bytes", done, (long)st.st_size);
    }
    close(from);
    close(to);
    sync_dir();
    if (done == st.st_size) {
        s.copied = 1;
        state_save(&s);
    }
}

static void reboot(void)
{
    say("I: agent: rebooting into the new image");
    if (cfg.reboot_exec) {
        execv("/proc/self/exe", cfg.argv);
        say("E: agent: cannot re-execute itself: %s", strerror(errno));
    }
    exit(0);   /* the board resets: hil (or whatever runs it) starts it again */
}

/* Steps 3..7 for a detected task. Returns the result to report, END_NO_REPORT, or reboots. */
static int run_task(const struct task *task, const char *running_md5)
{
    struct ota_state s;
    state_load(&s);
    int resumed = s.present && !strcmp(s.token, task->token) && !strcmp(s.md5, task->md5) &&
                  s.size == task->size && !strcmp(s.running, running_md5);
    if (!resumed) {
        memset(&s, 0, sizeof s);
        s.present = 1;
        snprintf(s.stage, sizeof s.stage, "download");
        snprintf(s.token, sizeof s.token, "%s", task->token);
        snprintf(s.target, sizeof s.target, "%s", task->target);
        snprintf(s.md5, sizeof s.md5, "%s", task->md5);
        snprintf(s.running, sizeof s.running, "%s", running_md5);
        s.size = task->size;
    }
#ifdef DEFECT_RESTARTS_DOWNLOAD
    if (!strcmp(s.stage, "download"))
        s.offset = 0;
#endif
    if (!strcmp(s.stage, "download")) {
#ifndef DEFECT_IGNORES_SPACE
        if (task->size > SLOT_SIZE)
            return R_NO_SPACE;
#endif
        if (s.offset < task->size) {
            int refused = token_check(task);
            if (refused != GO_ON)
                return refused;
        }
        if (s.offset > 0)
            say("I: agent: resuming the download at offset %ld", s.offset);
        state_save(&s);
        int failed = download(task, &s);
        if (failed)
            return failed;
        snprintf(s.stage, sizeof s.stage, "downloaded");
        state_save(&s);
    }
    if (!strcmp(s.stage, "downloaded") && !s.reported_101) {
#ifndef DEFECT_EARLY_101
        long answer = report(task->token, R_DOWNLOADED);
        if (answer == E_INVALID_OPERATION) {
            /* 21: an earlier 101 got through before a power cut (upgrading) or the task is
             * paused; detect tells them apart. */
            struct task again;
            char version[32], why[160], primary[1200];
            path_of(primary, sizeof primary, PRIMARY);
            image_version(primary, version, sizeof version, why, sizeof why);
            if (!detect(version, &again) || strcmp(again.token, task->token) != 0)
                return END_NO_REPORT;
        } else if (answer == E_NONE) {
            return END_KEEP;               /* unanswered: keep the package for next time */
        } else if (answer != E_OK) {
            return END_NO_REPORT;
        }
#endif
        s.reported_101 = 1;
        state_save(&s);
    }
    char path[1200], md5[33];
    path_of(path, sizeof path, SECONDARY);
    int good = file_md5_hex(path, task->size, md5) == 0 && !strcmp(md5, task->md5);
    say("ota phase=verify md5=%s", good ? "ok" : "bad");
#ifndef DEFECT_SKIPS_MD5
    if (!good)
        return R_MD5_MISMATCH;
#endif
#ifndef DEFECT_INSTALLS_OVERSIZED
    long span = image_span(path);
    if (span >= SLOT_SIZE) {
        say("ota phase=verify image=too-large bytes=%ld slot=%ld", span, SLOT_SIZE);
        return R_UPGRADE_OVERFLOW;
    }
#endif
    snprintf(s.stage, sizeof s.stage, "install");
    snprintf(s.image, sizeof s.image, "%s", md5);
#ifdef DEFECT_201_BEFORE_REBOOT
    report(task->token, R_UPGRADED);
    s.reported = 1;
#endif
    /* Committed before the copy starts: a power cut at any moment after this ends with the new
     * image installed (the next start copies it again) and reported. */
    s.copied = 0;
    state_save(&s);
    bootloader();
    reboot();
    return END_NO_REPORT;
}

/* One attempt (steps 1..7), then `ota end`, unless it rebooted to install. */
static void attempt(const char *version, const char *running_md5)
{
    char body[64];
    snprintf(body, sizeof body, "{\"s_version\":\"%s\"}", version);
    char path[256];
    snprintf(path, sizeof path, "/ota/device/version?dev_id=%s", cfg.dev_id);
    json_call("POST", path, body, NULL);       /* its answer is not needed to go on */
    struct task task;
    if (detect(version, &task)) {
        int outcome = run_task(&task, running_md5);
        if (outcome > 0) {                     /* a failure code */
            state_clear();
#ifndef DEFECT_SILENT_AFTER_FAILURE
            report(task.token, outcome);
#endif
        } else if (outcome != END_KEEP) {      /* ended without a report */
            state_clear();
        }
    }
    say("ota end");
}

/* Step 8: report what was booted after an install. */
static void after_install(const struct ota_state *s, const char *version, const char *md5)
{
    /* Upgraded: the image booted is the one installed, and it carries the target version. */
    int upgraded = !strcmp(md5, s->image) && !strcmp(version, s->target);
#ifdef DEFECT_201_ON_OLD_IMAGE
    upgraded = 1;
#endif
#ifdef DEFECT_NO_BOOT_REPORT
    (void)upgraded;
#else
    if (!s->reported)
        report(s->token, upgraded ? R_UPGRADED : R_VERSION_MISMATCH);
#endif
    state_clear();
    say("ota end");
}

/* ================================================================================ main */
static const char *env(const char *name, int required)
{
    const char *value = getenv(name);
    if ((!value || !*value) && required) {
        say("E: agent: environment variable %s is not set", name);
        exit(2);
    }
    return value && *value ? value : NULL;
}

static void configure(void)
{
    const char *url = env("HIL_OTA_URL", 0), *host = env("HIL_OTA_HOST", 0);
    const char *port = env("HIL_OTA_PORT", 0);
    cfg.base_path[0] = '\0';
    if (url) {   /* http://host[:port][/path] */
        if (strncmp(url, "http://", 7) != 0) {
            say("E: agent: HIL_OTA_URL must be an http:// URL");
            exit(2);
        }
        const char *authority = url + 7, *slash = strchr(authority, '/');
        size_t len = slash ? (size_t)(slash - authority) : strlen(authority);
        char hostport[sizeof cfg.host];
        snprintf(hostport, sizeof hostport, "%.*s", (int)len, authority);
        char *colon = strrchr(hostport, ':');
        snprintf(cfg.port, sizeof cfg.port, "%s", colon ? colon + 1 : "80");
        if (colon)
            *colon = '\0';
        snprintf(cfg.host, sizeof cfg.host, "%s", hostport);
        if (slash)
            snprintf(cfg.base_path, sizeof cfg.base_path, "%s", slash);
        size_t n = strlen(cfg.base_path);
        if (n && cfg.base_path[n - 1] == '/')
            cfg.base_path[n - 1] = '\0';
    } else {
        snprintf(cfg.port, sizeof cfg.port, "80");
    }
    /* HIL_OTA_HOST/PORT win over the URL's: the name the firmware resolves (through the rig's
     * DNS) and the port it was built for. */
    if (host)
        snprintf(cfg.host, sizeof cfg.host, "%s", host);
    if (port)
        snprintf(cfg.port, sizeof cfg.port, "%s", port);
    if (!cfg.host[0]) {
        say("E: agent: neither HIL_OTA_HOST nor HIL_OTA_URL is set");
        exit(2);
    }
    snprintf(cfg.product_id, sizeof cfg.product_id, "%s", env("HIL_PRODUCT_ID", 1));
    snprintf(cfg.dev_id, sizeof cfg.dev_id, "%s", env("HIL_DEV_ID", 1));
    cfg.key_len = base64_decode(env("HIL_ACCESS_KEY", 1), cfg.key, sizeof cfg.key);
    if (cfg.key_len <= 0) {
        say("E: agent: HIL_ACCESS_KEY is not valid base64");   /* never echo the key */
        exit(2);
    }
    snprintf(cfg.state_dir, sizeof cfg.state_dir, "%s", env("HIL_STATE_DIR", 1));
    const char *timeout = env("HIL_HTTP_TIMEOUT", 0), *period = env("HIL_CHECK_PERIOD", 0);
    cfg.http_timeout_s = timeout ? atoi(timeout) : DEFAULT_HTTP_TIMEOUT_S;
    if (cfg.http_timeout_s <= 0)
        cfg.http_timeout_s = DEFAULT_HTTP_TIMEOUT_S;
    cfg.check_period_s = period ? atoi(period) : 0;
    const char *page_ms = env("HIL_FLASH_PAGE_MS", 0);
    cfg.flash_page_ms = page_ms ? atol(page_ms) : DEFAULT_FLASH_PAGE_MS;
    if (cfg.flash_page_ms < 0)
        cfg.flash_page_ms = DEFAULT_FLASH_PAGE_MS;
    const char *reboot_mode = env("HIL_AGENT_REBOOT", 0);
    cfg.reboot_exec = reboot_mode && !strcmp(reboot_mode, "exec");
}

static const char *const DEFECTS =
    ""
#ifdef DEFECT_EARLY_101
    " early-101"
#endif
#ifdef DEFECT_IGNORES_SPACE
    " ignores-space"
#endif
#ifdef DEFECT_RESTARTS_DOWNLOAD
    " restarts-download"
#endif
#ifdef DEFECT_201_BEFORE_REBOOT
    " 201-before-reboot"
#endif
#ifdef DEFECT_201_ON_OLD_IMAGE
    " 201-on-old-image"
#endif
#ifdef DEFECT_RETRIES_FOREVER
    " retries-forever"
#endif
#ifdef DEFECT_SILENT_AFTER_FAILURE
    " silent-after-failure"
#endif
#ifdef DEFECT_SKIPS_MD5
    " skips-md5"
#endif
#ifdef DEFECT_TRUSTS_ANY_2XX
    " trusts-any-2xx"
#endif
#ifdef DEFECT_REPORTS_AFTER_TOKEN_END
    " reports-after-token-end"
#endif
#ifdef DEFECT_NO_BOOT_REPORT
    " no-boot-report"
#endif
#ifdef DEFECT_107_ON_OVERFLOW
    " 107-on-overflow"
#endif
#ifdef DEFECT_INSTALLS_OVERSIZED
    " installs-oversized"
#endif
    ;

int main(int argc, char **argv)
{
    (void)argc;
    cfg.argv = argv;
    setvbuf(stdout, NULL, _IOLBF, 0);
    struct sigaction term = { .sa_handler = on_term };
    sigaction(SIGTERM, &term, NULL);
    configure();
    say("I: onenet-agent (nrf52832, MCUboot) starting; defects:%s", *DEFECTS ? DEFECTS : " none");
    bootloader();

    char primary[1200], version[32], why[200], md5[33];
    path_of(primary, sizeof primary, PRIMARY);
    if (image_version(primary, version, sizeof version, why, sizeof why) != 0 ||
        file_md5_hex(primary, -1, md5) != 0) {
        say("E: no bootable image in " PRIMARY ": %s", why);
        return 1;                          /* a board that does not boot */
    }
    say("boot version=%s", version);

    struct ota_state s;
    state_load(&s);
    if (s.present && strcmp(s.running, md5) != 0 && strcmp(s.image, md5) != 0) {
        state_clear();                     /* reflashed with another image: not our attempt */
        s.present = 0;
    }
    if (s.present && !strcmp(s.stage, "install"))
        after_install(&s, version, md5);   /* the install's outcome first, then a check as */
    attempt(version, md5);                 /* at every boot (its version report says what runs) */
    for (;;) {                             /* idle until the next check, if any */
        if (cfg.check_period_s <= 0) {
            pause();
            continue;
        }
        sleep_ms(cfg.check_period_s * 1000L);
        attempt(version, md5);
    }
}
