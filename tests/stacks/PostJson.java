// POST a JSON body with Java's standard HttpClient, as InvoisX's Java example does. Its
// default version, HTTP/2, makes it offer `Upgrade: h2c` on every plain-http request.
// Usage: java PostJson.java URL BODY [IDEMPOTENCY-KEY]; prints the status, then the body.
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;

public class PostJson {
    public static void main(String[] args) throws Exception {
        HttpClient client = HttpClient.newHttpClient();
        HttpRequest.Builder request = HttpRequest.newBuilder(URI.create(args[0]))
            .header("Content-Type", "application/json")
            .header("Accept", "application/json")
            .POST(HttpRequest.BodyPublishers.ofString(args[1]));
        if (args.length > 2) {
            request.header("Idempotency-Key", args[2]);
        }
        HttpResponse<String> response = client.send(request.build(), HttpResponse.BodyHandlers.ofString());
        System.out.println(response.statusCode());
        System.out.println(response.body());
    }
}
